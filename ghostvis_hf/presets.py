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


# Set by `create` from the tokenizer, so not overridable.
_TOKEN_ID_FIELDS = ("image_token_id", "vision_start_token_id", "vision_end_token_id")


def check_config_overrides(overrides: dict, base: dict) -> None:
    """Refuses override keys the configs do not have, naming the key and what is allowed.

    Args:
        overrides (`dict`): `GhostVisConfig` fields; `text_config` / `vision_config` dicts of sub-config fields.
        base (`dict`): the preset's keyword arguments (from `preset_config_kwargs`).

    Example:
    ```python
    >>> from ghostvis_hf.presets import check_config_overrides, preset_config_kwargs

    >>> check_config_overrides({"text_config": {"num_hiden_layers": 2}}, preset_config_kwargs("tiny"))
    Traceback (most recent call last):
    ...
    ValueError: text_config (qwen2) has no field(s) ['num_hiden_layers']; see transformers' Qwen2Config

    ```
    """
    import inspect

    from transformers import CONFIG_MAPPING

    from .configuration_ghostvis import GhostVisConfig

    params = inspect.signature(GhostVisConfig.__init__).parameters
    allowed = [k for k, p in params.items() if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
               and k not in _TOKEN_ID_FIELDS]
    for key, value in overrides.items():
        if key not in allowed:
            raise ValueError(f"GhostVisConfig has no overridable field {key!r}; allowed: {allowed}")
        if key in ("text_config", "vision_config") and isinstance(value, dict):
            model_type = value.get("model_type", base[key]["model_type"])
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"{key}: unknown model_type {model_type!r}")
            unknown = _unknown_fields(CONFIG_MAPPING[model_type], value)
            if unknown:
                raise ValueError(f"{key} ({model_type}) has no field(s) {unknown}; see transformers' "
                                 f"{CONFIG_MAPPING[model_type].__name__}")


def _unknown_fields(config_class, fields: dict) -> list[str]:
    # A key is known if the default config has it, or if the config consumes it (transformers 5 turns the legacy
    # `rope_theta` into `rope_parameters`); a config keeps an unknown key as a stray attribute.
    default = config_class()
    unknown = []
    for key, value in fields.items():
        if key == "model_type" or hasattr(default, key):
            continue
        try:
            stray = hasattr(config_class(**{key: value}), key)
        except Exception:  # the value is refused: the real construction reports it with the config's own message
            stray = False
        if stray:
            unknown.append(key)
    return unknown


def load_tiny_tokenizer():
    """The byte-level BPE tokenizer shipped in the package (1,024 tokens, ChatML + GhostVis special tokens)."""
    import os

    from transformers import PreTrainedTokenizerFast

    from .processing_ghostvis import CHAT_TEMPLATE

    path = os.path.join(os.path.dirname(__file__), "assets", "tiny_tokenizer", "tokenizer.json")
    # Left padding is what generation needs, and a saved checkpoint's tokenizer carries it, so callers that pad batches
    # without naming a side (lmms-eval) generate correctly; the training collators (TRL's, GhostVis packing) pad on
    # the right by passing `padding_side="right"` themselves.
    tok = PreTrainedTokenizerFast(
        tokenizer_file=path, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
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
        **config_overrides: any `GhostVisConfig` field (e.g. `resampler_type="avgpool"`); `text_config` and
            `vision_config` dicts update only the keys they name (e.g. `text_config={"num_hidden_layers": 4}`).

    Returns:
        `(GhostVisForConditionalGeneration, GhostVisProcessor)`

    Raises:
        `ValueError`: for a key the configs do not have (a typo must not silently build the default model).
    """
    import torch

    from .configuration_ghostvis import GhostVisConfig
    from .modeling_ghostvis import GhostVisForConditionalGeneration
    from .processing_ghostvis import GhostVisProcessor, SPECIAL_TOKENS

    kwargs = preset_config_kwargs(preset)
    check_config_overrides(config_overrides, kwargs)
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
