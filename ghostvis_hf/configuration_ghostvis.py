# Copyright 2026 The GhostVis-HF authors. Licensed under the Apache License, Version 2.0.
"""GhostVis configuration: a composite config (vision tower + text decoder) plus resampler/projector fields.

Self-contained on purpose: this file is copied next to every checkpoint for `trust_remote_code`.
NOTE: written as a classic `__init__` config (not transformers' newer dataclass style) because that style is the
one every transformers 5.x release accepts from remote code.
"""

import math

from transformers import AutoConfig, PretrainedConfig

RESAMPLER_TYPES = ("perceiver", "avgpool", "none")
FEATURE_SELECT_STRATEGIES = ("full", "default")  # "default" drops the first (CLS) token, as LLaVA does
VISION_POSITION_INITS = ("default", "sincos2d")
# Written into every config so a saved folder loads through each Auto class with trust_remote_code=True.
AUTO_MAP = {
    "AutoConfig": "configuration_ghostvis.GhostVisConfig",
    "AutoModel": "modeling_ghostvis.GhostVisModel",
    "AutoModelForCausalLM": "modeling_ghostvis.GhostVisForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_ghostvis.GhostVisForConditionalGeneration",
}


class GhostVisConfig(PretrainedConfig):
    r"""
    Configuration of a GhostVis model: vision encoder → resampler → 2-layer MLP projector → decoder-only LM.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the vision tower; any `AutoModel` vision config (default `siglip_vision_model`;
            `clip_vision_model` works too).
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the decoder; any `AutoModel` decoder config (default `qwen2`).
        resampler_type (`str`, *optional*, defaults to `"perceiver"`):
            `"perceiver"` (learned latent queries with cross-attention), `"avgpool"` (2D average pooling of the patch
            grid) or `"none"` (all patches are image tokens).
        num_image_tokens (`int`, *optional*, defaults to 64):
            Tokens per image after the resampler (ignored for `"none"`; a perfect square for `"avgpool"`).
        resampler_depth (`int`, *optional*, defaults to 2): Perceiver blocks.
        resampler_heads (`int`, *optional*, defaults to 8): Perceiver attention heads.
        resampler_mlp_ratio (`int`, *optional*, defaults to 4): Perceiver MLP expansion.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`): activation of the MLP projector.
        vision_feature_layer (`int`, *optional*, defaults to -1):
            Hidden-state index of the vision tower fed to the resampler (-1: last layer's output).
        vision_feature_select_strategy (`str`, *optional*, defaults to `"full"`):
            `"full"` keeps every token, `"default"` drops the first (CLS) token (CLIP towers).
        image_token_id (`int`, *optional*): id of the placeholder token the image features replace.
        vision_start_token_id, vision_end_token_id (`int`, *optional*): ids framing each image's placeholder run.
        vision_position_init (`str`, *optional*, defaults to `"default"`):
            How a vision tower trained from scratch initialises its learned patch position embeddings: `"default"`
            (the tower's own random init) or `"sincos2d"` (a fixed 2D sine-cosine table of the patch grid, as in MAE
            and "Better plain ViT baselines", then trained). Only used when weights are initialised, never on load.
        tie_word_embeddings (`bool`, *optional*): defaults to the text config's value.
    """

    model_type = "ghostvis"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        resampler_type="perceiver",
        num_image_tokens=64,
        resampler_depth=2,
        resampler_heads=8,
        resampler_mlp_ratio=4,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_token_id=None,
        vision_start_token_id=None,
        vision_end_token_id=None,
        vision_position_init="default",
        tie_word_embeddings=None,
        **kwargs,
    ):
        from transformers import CONFIG_MAPPING

        if vision_config is None:
            vision_config = {"model_type": "siglip_vision_model", "vision_use_head": False}
        if isinstance(vision_config, dict):
            vision_config = dict(vision_config)
            vision_config = CONFIG_MAPPING[vision_config.pop("model_type", "siglip_vision_model")](**vision_config)
        if text_config is None:
            text_config = {"model_type": "qwen2"}
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = CONFIG_MAPPING[text_config.pop("model_type", "qwen2")](**text_config)
        self.vision_config = vision_config
        self.text_config = text_config

        if resampler_type not in RESAMPLER_TYPES:
            raise ValueError(f"resampler_type={resampler_type!r} is not supported; allowed: {list(RESAMPLER_TYPES)}")
        if vision_feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy={vision_feature_select_strategy!r} is not supported; "
                f"allowed: {list(FEATURE_SELECT_STRATEGIES)}"
            )
        if not isinstance(num_image_tokens, int) or num_image_tokens <= 0:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        num_layers = vision_config.num_hidden_layers
        if not -num_layers - 1 <= vision_feature_layer <= num_layers:
            raise ValueError(
                f"vision_feature_layer={vision_feature_layer} is out of range for a vision tower with {num_layers} "
                f"layers; allowed: {-num_layers - 1}..{num_layers}"
            )
        if vision_position_init not in VISION_POSITION_INITS:
            raise ValueError(
                f"vision_position_init={vision_position_init!r} is not supported; allowed: {list(VISION_POSITION_INITS)}"
            )
        self.vision_position_init = vision_position_init
        self.resampler_type = resampler_type
        self.num_image_tokens = num_image_tokens
        self.resampler_depth = resampler_depth
        self.resampler_heads = resampler_heads
        self.resampler_mlp_ratio = resampler_mlp_ratio
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token_id = image_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        if tie_word_embeddings is None:
            tie_word_embeddings = getattr(text_config, "tie_word_embeddings", False)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        kwargs.pop("image_seq_length", None)  # derived, written by to_dict for readers such as vLLM
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        if resampler_type == "avgpool":
            side = math.isqrt(num_image_tokens)
            if side * side != num_image_tokens or side > self.patch_grid_size:
                raise ValueError(
                    f"resampler_type='avgpool' needs num_image_tokens to be a perfect square no larger than the patch "
                    f"grid ({self.patch_grid_size}x{self.patch_grid_size}), got {num_image_tokens}"
                )

    @property
    def patch_grid_size(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def image_seq_length(self) -> int:
        """Number of placeholder tokens (= image features) per image."""
        if self.resampler_type == "none":
            n = self.patch_grid_size**2
            has_cls = getattr(self.vision_config, "model_type", "") == "clip_vision_model"
            if has_cls and self.vision_feature_select_strategy == "full":
                n += 1
            return n
        return self.num_image_tokens

    def to_dict(self):
        out = super().to_dict()
        out["image_seq_length"] = self.image_seq_length
        return out


__all__ = ["GhostVisConfig"]
