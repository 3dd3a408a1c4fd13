"""Named GhostVis configurations: `tiny` (tests, CPU main job), `small`, `1.5b` and `7b` (real-model shapes).

`1.5b` is Qwen2.5-1.5B + SigLIP-so400m-patch14-384 and `7b` is Qwen2.5-7B + SigLIP-so400m: created randomly
initialised (for benchmarks and smoke tests); `ghostvis_hf.compose` builds the same shapes from pretrained weights.
"""

import copy

_SIGLIP_SO400M_384 = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
    num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False,
)

PRESETS = {
    "tiny": dict(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, image_size=32, patch_size=4, vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            # NOTE: ~1/sqrt(hidden). The usual 0.02 is for wide models; at width 128 each 0.02-std layer shrinks the
            # signal ~4x, and from scratch the image -> answer path then sits on a long plateau (shapes sweep).
            rope_theta=10000.0, initializer_range=0.08,
        ),
        resampler_type="perceiver", num_image_tokens=16, resampler_depth=1, resampler_heads=4,
    ),
    "small": dict(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
            num_attention_heads=6, image_size=224, patch_size=16, vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
            rope_theta=1000000.0,
        ),
        resampler_type="perceiver", num_image_tokens=64, resampler_depth=2, resampler_heads=6,
    ),
    "1.5b": dict(
        vision_config=_SIGLIP_SO400M_384,
        text_config=dict(
            model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
            rope_theta=1000000.0, rms_norm_eps=1e-6,
        ),
        resampler_type="perceiver", num_image_tokens=64, resampler_depth=2, resampler_heads=16,
    ),
    "7b": dict(
        vision_config=_SIGLIP_SO400M_384,
        text_config=dict(
            model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False,
            rope_theta=1000000.0, rms_norm_eps=1e-6,
        ),
        resampler_type="perceiver", num_image_tokens=64, resampler_depth=2, resampler_heads=16,
    ),
}


def preset_config_kwargs(name: str) -> dict:
    """A deep copy of a preset's `GhostVisConfig` keyword arguments; `ValueError` for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def load_tiny_tokenizer():
    """The byte-level BPE tokenizer shipped in the package (1,024 tokens, ChatML + GhostVis special tokens)."""
    import os

    from transformers import PreTrainedTokenizerFast

    from .processing_ghostvis import CHAT_TEMPLATE

    path = os.path.join(os.path.dirname(__file__), "assets", "tiny_tokenizer", "tokenizer.json")
    tok = PreTrainedTokenizerFast(
        tokenizer_file=path, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_image_processor(image_size: int):
    """SigLIP preprocessing (resize to a square, scale to [-1, 1]) on the PIL backend.

    NOTE: the PIL backend is used everywhere (it needs no torchvision) so training and serving machines produce the
    same pixels; the torchvision backend resizes slightly differently.
    """
    from transformers.models.siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def create(preset: str = "tiny", tokenizer=None, dtype=None, device=None, **config_overrides):
    """Builds a randomly initialised GhostVis model and its processor from a named preset.

    Args:
        preset (`str`): one of `tiny`, `small`, `1.5b`, `7b`.
        tokenizer (*optional*): defaults to the shipped tiny byte-level BPE tokenizer (ids fit every preset's vocab).
        dtype (`torch.dtype`, *optional*): parameter dtype (e.g. `torch.bfloat16` for the big presets).
        device (*optional*): where to allocate the parameters (e.g. `"cuda"`).
        **config_overrides: any `GhostVisConfig` field (e.g. `resampler_type="avgpool"`).

    Returns:
        `(GhostVisForConditionalGeneration, GhostVisProcessor)`
    """
    import torch

    from .configuration_ghostvis import GhostVisConfig
    from .modeling_ghostvis import GhostVisForConditionalGeneration
    from .processing_ghostvis import GhostVisProcessor, SPECIAL_TOKENS

    kwargs = preset_config_kwargs(preset)
    for key in ("vision_config", "text_config"):
        if isinstance(config_overrides.get(key), dict):
            kwargs[key].update(config_overrides.pop(key))
    kwargs.update(config_overrides)
    tokenizer = tokenizer if tokenizer is not None else load_tiny_tokenizer()
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    if len(tokenizer) > kwargs["text_config"]["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the preset's vocab_size is "
                         f"{kwargs['text_config']['vocab_size']}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    kwargs["text_config"].setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs["text_config"].setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs["text_config"].setdefault("bos_token_id", tokenizer.bos_token_id)
    config = GhostVisConfig(
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    previous = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device or "cpu"):
            # `_from_config`, not the constructor: under DeepSpeed ZeRO-3 it builds the whole model inside one
            # `zero.Init` (the towers' own `from_config` would otherwise be partitioned in the training dtype while the
            # glue stayed fp32, and ZeRO-3 refuses parameter groups of mixed dtypes).
            model = GhostVisForConditionalGeneration._from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = GhostVisProcessor(
        image_processor=make_image_processor(config.vision_config.image_size),
        tokenizer=tokenizer,
        num_image_tokens=config.image_seq_length,
    )
    return model, processor
