"""What the recipes share: loading/creating/composing the model, freezing, LoRA defaults, data, bad-row checks.

Kept out of the recipes so `recipes/*.py` stay thin TRL scripts; kept out of the model files because those travel
with every checkpoint.
"""

import logging
import os
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("ghostvis")

# LoRA goes on the decoder's projections only; the glue (resampler + projector) trains fully alongside it.
LORA_TARGET_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_MODULES_TO_SAVE = ["resampler", "multi_modal_projector"]
QUANT_SKIP_MODULES = ["vision_tower", "resampler", "multi_modal_projector", "lm_head"]


@dataclass
class GhostVisArguments:
    """Model-source and data arguments shared by the alignment and SFT recipes."""

    preset: str = field(default="tiny", metadata={"help": "Preset to create when no model path/backbones are given."})
    text_model: str | None = field(default=None, metadata={"help": "Pretrained LM (path/Hub id) to compose from."})
    vision_model: str | None = field(default=None, metadata={"help": "Pretrained encoder (path/Hub id) to compose."})
    resampler_type: str | None = field(default=None, metadata={"help": "perceiver | avgpool | none (new models)."})
    num_image_tokens: int | None = field(default=None, metadata={"help": "Image tokens per image (new models)."})
    dataset_mixture: list[str] | None = field(
        default=None,
        metadata={"help": "Datasets to mix, each `name:path_or_hub_id:weight` (e.g. vqav2:/data/vqa:0.8 "
                          "text_chat:/data/smoltalk.jsonl:0.2); overrides dataset_name."},
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the built-in data (same held-out set as eval)."})
    num_train_samples: int | None = field(default=None, metadata={"help": "Rows of training data to use."})
    num_eval_samples: int | None = field(default=None, metadata={"help": "Held-out rows for the final evaluation."})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Keep the vision encoder frozen."})
    freeze_language_model: bool = field(default=False, metadata={"help": "Keep the decoder and LM head frozen."})
    bad_rows: str = field(default="skip", metadata={"help": "skip (count and drop) | error (refuse, naming the row)."})
    kernels: bool = field(default=True, metadata={"help": "Swap in fused kernels on CUDA (ghostvis_hf.kernels)."})
    eval_after_training: bool = field(default=True, metadata={"help": "Generate on the held-out split and score."})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the final generation-based eval."})
    plot: bool = field(default=True, metadata={"help": "Save a learning-curve plot in the output folder."})


def load_model_and_processor(args: GhostVisArguments, model_args, training_args):
    """A GhostVis model + processor from a checkpoint (`model_name_or_path`), backbones, or a preset."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import ghostvis_hf

    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    if model_args.model_name_or_path:
        kwargs = dict(trust_remote_code=True, revision=model_args.model_revision, dtype=dtype)
        if model_args.attn_implementation:
            kwargs["attn_implementation"] = model_args.attn_implementation
        if model_args.load_in_4bit or model_args.load_in_8bit:
            from trl import get_quantization_config

            quant = get_quantization_config(model_args)
            quant.llm_int8_skip_modules = QUANT_SKIP_MODULES
            kwargs["quantization_config"] = quant
        model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **kwargs)
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    elif args.text_model or args.vision_model:
        if not (args.text_model and args.vision_model):
            raise ValueError("Composing needs both --text_model and --vision_model")
        model, processor = ghostvis_hf.compose(args.text_model, args.vision_model, **_glue_overrides(args))
    else:
        torch.manual_seed(training_args.seed)
        model, processor = ghostvis_hf.create(args.preset, **_glue_overrides(args))
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.model_name_or_path:
        raise ValueError("QLoRA (load_in_4bit/8bit) needs --model_name_or_path of a saved GhostVis checkpoint")
    if model_args.attn_implementation and not model_args.model_name_or_path:
        model.set_attn_implementation(model_args.attn_implementation)
    return model, processor


def _glue_overrides(args: GhostVisArguments) -> dict:
    return {k: v for k, v in (("resampler_type", args.resampler_type), ("num_image_tokens", args.num_image_tokens))
            if v is not None}


def freeze(model, vision_tower: bool, language_model: bool) -> dict:
    """Freezes the chosen towers; returns and logs trainable vs frozen parameter counts."""
    parts = []
    if vision_tower:
        parts.append(model.model.vision_tower)
    if language_model:
        parts += [model.model.language_model, model.lm_head]
    for part in parts:
        part.requires_grad_(False)
    counts = parameter_counts(model)
    logger.info("trainable parameters: %s | frozen: %s", f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    return counts


def parameter_counts(model) -> dict:
    seen, trainable, frozen = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return {"trainable": trainable, "frozen": frozen}


def peft_config_for(model_args):
    """TRL's LoRA config with GhostVis defaults (decoder projections; resampler + projector fully trained)."""
    from trl import get_peft_config

    if not model_args.use_peft:
        return None
    if model_args.lora_target_modules is None:
        model_args.lora_target_modules = LORA_TARGET_REGEX
    if model_args.lora_modules_to_save is None:
        model_args.lora_modules_to_save = LORA_MODULES_TO_SAVE
    return get_peft_config(model_args)


def load_train_and_eval_data(dataset_name: str | None, args: GhostVisArguments):
    """(train, held-out) datasets in TRL's conversational vision format."""
    from . import data

    if args.dataset_mixture:
        parts = []
        for spec in args.dataset_mixture:
            try:
                name, path, weight = spec.rsplit(":", 2) if spec.count(":") >= 2 else (*spec.split(":"), "1")
            except ValueError:
                raise ValueError(f"dataset_mixture entry {spec!r} is not name:path:weight") from None
            parts.append((data.get_dataset(name, path_or_hub_id=path, split="train"), float(weight)))
        return data.mix_datasets(parts, num_samples=args.num_train_samples, seed=args.dataset_seed), None
    name = dataset_name or "shapes"
    if name in ("shapes", "shapes_captions"):
        from .data.shapes import load_shapes

        # shapes_captions: the alignment stage's caption-only variant
        kw = {"question_types": ("caption",)} if name == "shapes_captions" else {}
        train = load_shapes("train", num_samples=args.num_train_samples, seed=args.dataset_seed, **kw)
        held_out = load_shapes("test", num_samples=args.num_eval_samples, seed=args.dataset_seed, **kw)
        return train, held_out
    if os.path.exists(name) or "/" in name:
        raise ValueError(f"Name the source of {name!r} with --dataset_mixture name:path:weight "
                         f"(names: {sorted(data.DATASETS)})")
    return data.get_dataset(name, split="train", limit=args.num_train_samples), None
