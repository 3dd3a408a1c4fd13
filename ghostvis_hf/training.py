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
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Overrides of the preset's GhostVisConfig for new models, comma-separated key=value with "
                          "dotted keys into the sub-configs, e.g. 'text_config.num_hidden_layers=4,resampler_depth=2'."},
    )
    dataset_mixture: list[str] | None = field(
        default=None,
        metadata={"help": "Datasets to mix, each `name:path_or_hub_id:weight` (e.g. vqav2:/data/vqa:0.8 "
                          "text_chat:/data/smoltalk.jsonl:0.2); overrides dataset_name."},
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the built-in data (same held-out set as eval)."})
    num_train_samples: int | None = field(default=None, metadata={"help": "Rows of training data to use."})
    num_eval_samples: int | None = field(default=None, metadata={"help": "Held-out rows for the final evaluation."})
    shapes_max_turns: int = field(
        default=1,
        metadata={"help": "Built-in shapes data: up to this many QA turns per training image (the held-out split "
                          "stays single-turn)."},
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Keep the vision encoder frozen."})
    freeze_language_model: bool = field(default=False, metadata={"help": "Keep the decoder and LM head frozen."})
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower (LLaVA's mm_vision_tower_lr); "
                                        "defaults to learning_rate."})
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the resampler + projector (LLaVA's mm_projector_lr); "
                                        "defaults to learning_rate."})
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "PyTorch threads when training on the CPU; 0 = every core this process may use. "
                          "`accelerate launch` without a config pins a CPU run to OMP_NUM_THREADS=1."},
    )
    bad_rows: str = field(default="skip", metadata={"help": "skip (count and drop) | error (refuse, naming the row)."})
    kernels: bool = field(default=True, metadata={"help": "Swap in fused kernels on CUDA (ghostvis_hf.kernels)."})
    eval_after_training: bool = field(default=True, metadata={"help": "Generate on the held-out split and score."})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the final generation-based eval."})
    plot: bool = field(default=True, metadata={"help": "Save a learning-curve plot in the output folder."})


def set_cpu_threads(args: GhostVisArguments) -> None:
    """Applies `cpu_threads` when no GPU is in use (a no-op when it is unset)."""
    if args.cpu_threads is None or torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.cpu_threads or cores)
    logger.info("CPU threads: %d", torch.get_num_threads())


def score_labelled_positions_only() -> bool:
    """Makes TRL's fused LM head score only the labelled positions on the CPU too, as it already does on CUDA.

    TRL computes per-token log-probs over *every* position off Triton devices (fixed tile shapes for compilers such
    as Neuron's); in the tiny main job only ~15 % of positions carry a label, and the head's forward and backward over
    the rest were ~20 % of a CPU step. The labelled positions' values are the same either way. Patches one name in
    `trl.trainer.utils` (TRL 1.x); returns False and changes nothing if that name is gone.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        return False
    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "_ghostvis_compact", False):
        return original is not None

    def use_compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    use_compact._ghostvis_compact = True
    trl_utils._use_triton = use_compact
    return True


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


def parse_config_overrides(text: str | None) -> dict:
    """`'a=1,text_config.b=0.5,c=none'` -> `{'a': 1, 'text_config': {'b': 0.5}, 'c': 'none'}` (values as literals)."""
    import ast

    out: dict = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or key.count(".") > 1:
            raise ValueError(f"config_overrides: {item!r} is not `key=value` or `sub_config.key=value`")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        head, _, tail = key.strip().partition(".")
        if tail:
            if head not in ("text_config", "vision_config"):
                raise ValueError(f"config_overrides: {key!r}; dotted keys go into text_config or vision_config")
            out.setdefault(head, {})[tail] = value
        else:
            out[head] = value
    return out


def _check_config_overrides(overrides: dict, preset: str) -> None:
    """Refuses keys the configs don't have: a typo must not silently train the default model."""
    import inspect

    from transformers import CONFIG_MAPPING

    from .configuration_ghostvis import GhostVisConfig
    from .presets import preset_config_kwargs

    base = preset_config_kwargs(preset)
    for key, value in overrides.items():
        if key in ("text_config", "vision_config"):
            sub = CONFIG_MAPPING[base[key]["model_type"]]()
            unknown = [k for k in value if not hasattr(sub, k)]
            if unknown:
                raise ValueError(f"config_overrides: {key} ({base[key]['model_type']}) has no field(s) {unknown}")
        elif key not in inspect.signature(GhostVisConfig.__init__).parameters:
            raise ValueError(f"config_overrides: GhostVisConfig has no field {key!r}")


def _glue_overrides(args: GhostVisArguments) -> dict:
    overrides = parse_config_overrides(args.config_overrides)
    if overrides:
        if args.text_model or args.vision_model:
            raise ValueError("config_overrides applies to presets; compose takes the backbones' own configs")
        _check_config_overrides(overrides, args.preset)
    overrides.update({k: v for k, v in (("resampler_type", args.resampler_type),
                                        ("num_image_tokens", args.num_image_tokens)) if v is not None})
    return overrides


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


def make_optimizer(model, training_args, args: GhostVisArguments):
    """AdamW with separate learning rates for the vision tower and the glue, as LLaVA's `mm_*_lr`; or `None`.

    `None` (the trainer's own optimizer) unless `vision_tower_lr` or `projector_lr` is set. Pass the result to
    `SFTTrainer(optimizers=(optimizer, None))`: the trainer still builds the LR schedule, which scales every group.
    Biases and norm weights get no weight decay, like the trainer's default.
    """
    if args.vision_tower_lr is None and args.projector_lr is None:
        return None
    if training_args.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError(f"vision_tower_lr/projector_lr build AdamW; optim={training_args.optim!r} is not supported")
    lr = training_args.learning_rate
    group_lr = {"vision": args.vision_tower_lr or lr, "glue": args.projector_lr or lr, "text": lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = ("vision" if ".vision_tower." in f".{name}" else
                "glue" if (".resampler." in f".{name}" or ".multi_modal_projector." in f".{name}") else "text")
        decay = p.ndim >= 2 and "norm" not in name
        groups.setdefault((part, decay), []).append(p)
    param_groups = [{"params": ps, "lr": group_lr[part], "weight_decay": training_args.weight_decay if decay else 0.0}
                    for (part, decay), ps in groups.items()]
    logger.info("optimizer learning rates: %s", group_lr)
    return torch.optim.AdamW(param_groups, lr=lr, betas=(training_args.adam_beta1, training_args.adam_beta2),
                             eps=training_args.adam_epsilon)


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
        train = load_shapes("train", num_samples=args.num_train_samples, seed=args.dataset_seed,
                            max_turns=args.shapes_max_turns, **kw)
        held_out = load_shapes("test", num_samples=args.num_eval_samples, seed=args.dataset_seed, **kw)
        return train, held_out
    if os.path.exists(name) or "/" in name:
        raise ValueError(f"Name the source of {name!r} with --dataset_mixture name:path:weight "
                         f"(names: {sorted(data.DATASETS)})")
    return data.get_dataset(name, split="train", limit=args.num_train_samples), None
