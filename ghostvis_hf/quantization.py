"""Which GhostVis modules stay unquantized under bitsandbytes int8/nf4, for QLoRA training and quantized serving.

The vision tower, resampler, projector and `lm_head` stay in bf16: they are a small share of the bytes (the decoder's
linear layers are ~90% of a 1.5B model) and quantizing them costs the most accuracy (image features, output
distribution). Training (`ghostvis_hf.training`) and loading for inference (`ghostvis_hf.inference.loader`) both read
this one list.
"""

# A tuple so that no caller can change it for the others; `BitsAndBytesConfig` gets `list(QUANT_SKIP_MODULES)`.
QUANT_SKIP_MODULES = ("vision_tower", "resampler", "multi_modal_projector", "lm_head")
