"""The model a recipe trains: loaded from a checkpoint, composed from backbones or created from a preset; frozen
towers; LoRA defaults; parameter counts (after LoRA wrapping).

A LoRA adapter is only usable next to the exact weights it was trained on. A model made here (preset or composed) has
no folder to point at, so `load_model_and_processor` saves it to `OUTPUT_DIR/base` before training and the adapter's
`base_model_name_or_path` names that folder (absolute path):
`peft.AutoPeftModelForCausalLM.from_pretrained("OUTPUT_DIR/adapter", trust_remote_code=True)` loads base + adapter
(in a process that imported `ghostvis_hf`, which registers GhostVis for `AutoModelForCausalLM`); anywhere, and after
moving the folder, `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("OUTPUT_DIR/base",
trust_remote_code=True), "OUTPUT_DIR/adapter")`.

Config overrides (`--config_overrides`) are parsed here and checked by `ghostvis_hf.create`, which refuses keys the
configs do not have.
"""

import ast
import logging
import os

import torch

from ..quantization import QUANT_SKIP_MODULES
from .arguments import GhostVisArguments
from .launch import env_flag, sharded_by

logger = logging.getLogger("ghostvis")

# LoRA goes on the decoder's projections only; the glue (resampler + projector) trains fully alongside it.
LORA_TARGET_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_MODULES_TO_SAVE = ["resampler", "multi_modal_projector"]
# Where a LoRA run on a model made from a preset/backbones keeps the weights its adapter applies to.
LORA_BASE_SUBFOLDER = "base"


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
            quant.llm_int8_skip_modules = list(QUANT_SKIP_MODULES)
            kwargs["quantization_config"] = quant
        model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **kwargs)
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    elif args.text_model or args.vision_model:
        if not (args.text_model and args.vision_model):
            raise ValueError("Composing needs both --text_model and --vision_model")
        model, processor = ghostvis_hf.compose(args.text_model, args.vision_model, dtype=dtype,
                                               **_glue_overrides(args))
    else:
        torch.manual_seed(training_args.seed)
        model, processor = ghostvis_hf.create(args.preset, dtype=dtype, device=init_device(training_args),
                                              **_glue_overrides(args))  # --dtype too
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.model_name_or_path:
        raise ValueError("QLoRA (load_in_4bit/8bit) needs --model_name_or_path of a saved GhostVis checkpoint")
    if model_args.attn_implementation and not model_args.model_name_or_path:
        model.set_attn_implementation(model_args.attn_implementation)
    if model_args.use_peft and not model_args.model_name_or_path:
        save_lora_base(model, processor, training_args)
    return model, processor


def init_device(training_args) -> torch.device | None:
    """Where a preset's random weights are made: the GPU this process trains on (a 7b preset takes minutes to
    initialise on the CPU, seconds there; DDP broadcasts rank 0's weights anyway), or `None` (the CPU) for CPU runs
    and for DeepSpeed / FSDP, whose launchers place (ZeRO-3: partition at construction) the weights themselves."""
    on_cpu = getattr(training_args, "use_cpu", False) or env_flag("ACCELERATE_USE_CPU")
    if not torch.cuda.is_available() or on_cpu or sharded_by(training_args):
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def save_lora_base(model, processor, training_args) -> str:
    """Saves a model that has no folder of its own (preset/composed) to `output_dir/base` and points the model's
    `name_or_path` there, which is what PEFT writes as the adapter's `base_model_name_or_path`.

    Without it, an adapter trained on a fresh preset saved `base_model_name_or_path: null` and nothing to load it
    onto. Returns the base folder (absolute).
    """
    from ..hub import save_checkpoint

    base = os.path.abspath(os.path.join(training_args.output_dir, LORA_BASE_SUBFOLDER))
    if training_args.should_save:  # the main process; the others only need the path
        save_checkpoint(model, processor, base,
                        origin="The untrained starting point of the LoRA adapter in `../adapter`: load it with "
                               "`PeftModel.from_pretrained(base_model, adapter_folder)`.")
        logger.info("LoRA on a new model: its base weights saved to %s (the adapter's base_model_name_or_path)", base)
    model.name_or_path = base
    return base


def parse_config_overrides(text: str | None) -> dict:
    """`'a=1,text_config.b=0.5,c=none'` -> `{'a': 1, 'text_config': {'b': 0.5}, 'c': 'none'}` (values as literals).

    Example:
    ```python
    >>> from ghostvis_hf.training import parse_config_overrides

    >>> parse_config_overrides("resampler_depth=2,text_config.num_hidden_layers=4")
    {'resampler_depth': 2, 'text_config': {'num_hidden_layers': 4}}

    ```
    """
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


def _glue_overrides(args: GhostVisArguments) -> dict:
    """`create`/`compose` keyword arguments from the arguments; `create` refuses keys the configs lack."""
    overrides = parse_config_overrides(args.config_overrides)
    if overrides and (args.text_model or args.vision_model):
        raise ValueError("config_overrides applies to presets; compose takes the backbones' own configs")
    overrides.update({k: v for k, v in (("resampler_type", args.resampler_type),
                                        ("num_image_tokens", args.num_image_tokens)) if v is not None})
    return overrides


def freeze(model, vision_tower: bool, language_model: bool) -> dict:
    """Freezes the chosen towers; returns trainable vs frozen parameter counts.

    With LoRA these are the counts *before* the trainer wraps the model (everything still trainable): log the
    trainer's model with `log_parameter_counts(trainer.model)` once the trainer exists.
    """
    parts = []
    if vision_tower:
        parts.append(model.model.vision_tower)
    if language_model:
        parts += [model.model.language_model, model.lm_head]
    for part in parts:
        part.requires_grad_(False)
    return parameter_counts(model)


def log_parameter_counts(model) -> dict:
    """Logs and returns `parameter_counts(model)`; give it the trainer's model (`trainer.model`), which is the
    PEFT-wrapped one under `--use_peft`."""
    counts = parameter_counts(model)
    logger.info("trainable parameters: %s | frozen: %s", f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    return counts


def parameter_counts(model) -> dict:
    """`{"trainable": n, "frozen": m}` parameters, tied weights counted once; for a PEFT model, peft's own count
    (`get_nb_trainable_parameters`: LoRA matrices and `modules_to_save` copies trainable, the base frozen)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return {"trainable": trainable, "frozen": total - trainable}
    seen, trainable, frozen = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
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


def apply_gpu_speedups(model, args: GhostVisArguments) -> dict | None:
    """The fused kernels (`--kernels`) and compiled layers (`--compile_layers`) for the GPU the trainer moves the
    model to; returns what `apply_kernels` made active, `None` on a machine without CUDA (plain PyTorch there).

    With `compile_layers` the decoder's and the vision encoder's layers are compiled in place
    (`kernels.compile_decoder_layers`: `nn.Module.compile`, so parameter names and checkpoints are unchanged;
    accelerate's `compile_regions` wraps them in new modules instead) and Liger's norm/SwiGLU/RoPE swaps stay out
    (Inductor fuses those itself). Refused under DeepSpeed ZeRO-3, whose per-module parameter hooks the compiled
    layers would trace.
    """
    from ..kernels import apply_kernels, compile_decoder_layers

    if not torch.cuda.is_available():
        if args.compile_layers:
            logger.warning("compile_layers applies to CUDA runs; this one is on the CPU: the layers run uncompiled")
        return None
    if args.compile_layers and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ValueError("compile_layers does not run under DeepSpeed ZeRO-3 (its parameter-gathering hooks); use "
                         "ZeRO-2 or FSDP2, or --compile_layers false")
    active = None
    if args.kernels:
        layer_kernels = not args.compile_layers
        swiglu = ("recompute" if getattr(args, "recompute_mlp", False) else True) if layer_kernels else False
        active = apply_kernels(model, rms_norm=layer_kernels, swiglu=swiglu, rope=layer_kernels, device="cuda")
        logger.info("kernels: %s", active)
    if args.compile_layers:
        if getattr(args, "recompute_mlp", False):
            logger.warning("recompute_mlp applies to the eager Liger MLPs; with compile_layers Inductor decides "
                           "what the compiled layers keep")
        logger.info("compiled layers (decoder + vision encoder): %d", compile_decoder_layers(model, vision=True))
    return active
