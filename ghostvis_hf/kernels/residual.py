"""An fp32 residual stream for bf16 parameters (Megatron-LM's `--fp32-residual-connection`).

Under bf16 autocast with fp32 weights the residual stream of a pre-norm transformer is fp32: the embeddings come out
fp32 and each sublayer's bf16 output is added to an fp32 sum. With bf16 parameters (`--precision bf16_master`) the
embeddings come out bf16, so every residual add rounds the running sum to 8 bits of mantissa, 28 times in the 1.5b
decoder and 27 in its vision tower. `fp32_residual_stream(model)` puts the fp32 sum back with hooks, weights untouched:

- the text embeddings and the vision tower's patch embeddings return fp32, so every `residual + sublayer(x)` of the
  layers after them is an fp32 add (torch promotes bf16 + fp32);
- every norm (RMSNorm, LayerNorm) casts its input to its weight's dtype first, so the sublayers still read bf16
  (one cast per norm; under autocast a LayerNorm then runs in fp32 as before);
- the rotary tables (`*RotaryEmbedding`, computed in the input's dtype) are returned in the parameters' dtype;
- the resampler reads its input in its own dtype (an intermediate vision layer's features are the fp32 sum).

The model's outputs keep their dtype (the final norms return bf16), so losses and heads are unchanged.
"""

import torch
from torch import nn

_HANDLES = "_ghostvis_fp32_residual_hooks"


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _to_float32(module, args, output):
    return output.float() if torch.is_tensor(output) and output.is_floating_point() else output


def _input_to_weight_dtype(module, args):
    dtype = module.weight.dtype if getattr(module, "weight", None) is not None else None
    if dtype is None or not args or not torch.is_tensor(args[0]) or args[0].dtype == dtype:
        return None
    return (args[0].to(dtype), *args[1:])


def _input_to_param_dtype(module, args):
    param = next(module.parameters(), None)
    if param is None or not args or not torch.is_tensor(args[0]) or args[0].dtype == param.dtype:
        return None
    return (args[0].to(param.dtype), *args[1:])


def _rotary_to_param_dtype(module, args, output):
    # the tables follow the input's dtype (fp32 now); the attention reads them with bf16 queries and keys
    dtype = getattr(module, "_ghostvis_param_dtype", None)
    if dtype is None or not isinstance(output, tuple):
        return output
    return tuple(t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in output)


def _vision_embeddings(model) -> nn.Module | None:
    tower = model.model.vision_tower
    return getattr(getattr(tower, "vision_model", tower), "embeddings", None)


def fp32_residual_stream(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Installs the hooks above on a GhostVis model (`GhostVisForConditionalGeneration`, also under PEFT); returns
    how many. `dtype` is what the rotary tables are cast to (the parameters' compute dtype). Idempotent.

    Example:
    ```python
    >>> import torch
    >>> from ghostvis_hf.presets import create
    >>> from ghostvis_hf.kernels.residual import fp32_residual_stream, remove_fp32_residual_stream
    >>> model, _ = create("tiny", dtype=torch.bfloat16)
    >>> fp32_residual_stream(model) > 0
    True
    >>> layer = model.model.language_model.layers[0]
    >>> seen = layer.register_forward_hook(lambda module, args, out: print(out.dtype))  # the layer's output
    >>> _ = model(input_ids=torch.tensor([[5, 6, 7]]))
    torch.float32
    >>> remove_fp32_residual_stream(model); _ = model(input_ids=torch.tensor([[5, 6, 7]]))
    torch.bfloat16

    ```
    """
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    remove_fp32_residual_stream(model)
    handles = [model.get_input_embeddings().register_forward_hook(_to_float32)]
    embeddings = _vision_embeddings(model)
    if embeddings is not None:
        handles.append(embeddings.register_forward_hook(_to_float32))
    handles.append(model.model.resampler.register_forward_pre_hook(_input_to_param_dtype))
    for module in model.modules():
        if _is_norm(module):
            handles.append(module.register_forward_pre_hook(_input_to_weight_dtype))
        elif type(module).__name__.endswith("RotaryEmbedding"):
            module._ghostvis_param_dtype = dtype
            handles.append(module.register_forward_hook(_rotary_to_param_dtype))
    setattr(model, _HANDLES, handles)
    return len(handles)


def remove_fp32_residual_stream(model) -> None:
    """Removes what `fp32_residual_stream` installed (nothing if it was not)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    for handle in getattr(model, _HANDLES, ()):
        handle.remove()
    if hasattr(model, _HANDLES):
        delattr(model, _HANDLES)
    for module in model.modules():
        if hasattr(module, "_ghostvis_param_dtype"):
            del module._ghostvis_param_dtype


__all__ = ["fp32_residual_stream", "remove_fp32_residual_stream"]
