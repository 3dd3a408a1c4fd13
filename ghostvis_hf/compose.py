"""Build GhostVis from pretrained backbones (e.g. Qwen2.5-*-Instruct + SigLIP), from local paths or Hub ids.

The decoder and LM head are copied from the causal LM, the vision tower from the encoder (a full SigLIP/CLIP model or
its vision half), the processor from the LM's tokenizer and the encoder's image processor; the GhostVis special tokens
are added and the embeddings resized only if the tokenizer outgrows them. Resampler and projector start random: train
them with `recipes/align.py`.
"""

import argparse

import torch

from .arg_types import folder_or_hub_id, positive_int
from .configuration_ghostvis import GhostVisConfig
from .modeling_ghostvis import GhostVisForConditionalGeneration
from .processing_ghostvis import CHAT_TEMPLATE, SPECIAL_TOKENS, GhostVisProcessor


def _vision_config(cfg):
    return cfg.vision_config if hasattr(cfg, "vision_config") else cfg


def _load_vision_weights(tower, source, name: str) -> None:
    """Copies a SigLIP/CLIP (vision) model's weights into the tower, whatever the wrapping on either side.

    NOTE: transformers releases differ on whether `*VisionModel` wraps its layers in `.vision_model`; matching on
    stripped key names works for both layouts.
    """
    skip = ("text_model.", "logit_", "text_projection", "visual_projection", "head.")
    src = {k.removeprefix("vision_model."): v for k, v in source.state_dict().items()}
    src = {k: v for k, v in src.items() if not k.startswith(skip)}
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""
    missing, unexpected = tower.load_state_dict({prefix + k: v for k, v in src.items()}, strict=False)
    missing = [k for k in missing if not k.removeprefix(prefix).startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"vision weights of {name!r} do not fit: missing {missing}, unexpected {unexpected}")


def compose(text_model: str, vision_model: str, dtype=None, **config_overrides):
    """Composes a GhostVis model and processor from a pretrained causal LM and a pretrained vision encoder.

    Args:
        text_model (`str`): local folder or Hub id of an `AutoModelForCausalLM` (e.g. `Qwen/Qwen2.5-1.5B-Instruct`).
        vision_model (`str`): local folder or Hub id of a SigLIP/CLIP model or vision model
            (e.g. `google/siglip-so400m-patch14-384`).
        dtype (`torch.dtype`, *optional*): dtype to load the backbones in.
        **config_overrides: `GhostVisConfig` fields (`resampler_type`, `num_image_tokens`, ...).

    Returns:
        `(GhostVisForConditionalGeneration, GhostVisProcessor)`
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_model)
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # for generation, saved with the checkpoint (see presets.load_tiny_tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(text_model, dtype=dtype)
    vision_cfg = _vision_config(AutoConfig.from_pretrained(vision_model))
    if hasattr(vision_cfg, "vision_use_head"):
        vision_cfg.vision_use_head = False  # the pooling head is never used: leave it out (DDP unused params)
    if vision_cfg.model_type == "clip_vision_model":
        config_overrides.setdefault("vision_feature_select_strategy", "default")  # drop CLS, as LLaVA does
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = GhostVisConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=lm.config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_overrides,
    )
    model = GhostVisForConditionalGeneration(config)
    if dtype is not None:
        model.to(dtype)
    base = getattr(lm, lm.base_model_prefix)
    model.model.language_model.load_state_dict(base.state_dict())
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    _load_vision_weights(model.model.vision_tower, AutoModel.from_pretrained(vision_model, dtype=dtype), vision_model)
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    model.tie_weights()
    model.generation_config.eos_token_id = lm.generation_config.eos_token_id or lm.config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = AutoImageProcessor.from_pretrained(vision_model)
    processor = GhostVisProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=config.image_seq_length,
    )
    return model, processor


def main(argv=None) -> int:
    """`ghostvis compose --text LM --vision ENCODER --out DIR`."""
    from .hub import refuse_full_output_folder, save_checkpoint

    parser = argparse.ArgumentParser(prog="ghostvis compose", description=compose.__doc__.splitlines()[0])
    parser.add_argument("--text", required=True, type=folder_or_hub_id, help="causal LM: local folder or Hub id")
    parser.add_argument("--vision", required=True, type=folder_or_hub_id, help="vision encoder: local folder or Hub id")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resampler", default="perceiver", choices=["perceiver", "avgpool", "none"])
    parser.add_argument("--num-image-tokens", type=positive_int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    args = parser.parse_args(argv)
    refuse_full_output_folder(parser, args.out, args.overwrite)  # before the backbones load
    model, processor = compose(
        args.text, args.vision, dtype=getattr(torch, args.dtype),
        resampler_type=args.resampler, num_image_tokens=args.num_image_tokens,
    )
    save_checkpoint(model, processor, args.out, origin=f"Composed from `{args.text}` and `{args.vision}`.",
                    base_models=[args.text, args.vision])
    print(f"wrote {args.out}")
    return 0
