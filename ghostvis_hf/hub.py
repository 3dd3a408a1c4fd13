"""Writing complete checkpoint folders (weights, config, processor, code files, model card), `ghostvis init` and
`ghostvis upgrade` (refreshes the code files of a folder saved by an older GhostVis).

A folder written here is what `push_to_hub` uploads and what `from_pretrained(..., trust_remote_code=True)` reads:
`save_pretrained` already copies the modeling/configuration/processing files (the classes are registered for the
Auto classes in `ghostvis_hf/__init__.py`); this module adds the model card.
"""

import argparse
import os
import shutil
import tempfile

CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: image-text-to-text
license: apache-2.0
tags:
- ghostvis
- vision-language
- image-text-to-text
- custom_code
{base_models}---

# {name}

A [GhostVis](https://github.com/ghostvis/ghostvis-hf) vision-language model: {vision} vision encoder →
{resampler} resampler ({image_tokens} tokens per image) → 2-layer MLP projector → {text} decoder
({params:.1f}M parameters).

{origin}

## Use

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image

model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=text, images=Image.open("image.png"), return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def model_card(model, repo: str = "path/to/checkpoint", origin: str = "", base_models=()) -> str:
    """Renders the model card (`README.md`) for a GhostVis checkpoint."""
    cfg = model.config
    bases = "".join(f"- {b}\n" for b in base_models)
    return CARD_TEMPLATE.format(
        base_models=f"base_model:\n{bases}" if bases else "",
        name=os.path.basename(os.path.normpath(repo)) or "GhostVis",
        vision=cfg.vision_config.model_type,
        text=cfg.text_config.model_type,
        resampler=cfg.resampler_type,
        image_tokens=cfg.image_seq_length,
        params=sum(p.numel() for p in model.parameters()) / 1e6,
        origin=origin,
        repo=repo,
    )


def training_origin(recipe: str, stage: str, data, training_args=None, model_args=None, gv_args=None) -> str:
    r"""
    The model card's account of a training run: a sentence and a table naming the recipe, the starting point, the
    data actually used and the key hyper-parameters, read from the recipe's own arguments.

    Args:
        recipe (`str`): the script, e.g. `"recipes/sft.py"`.
        stage (`str`): what it does, e.g. `"multimodal SFT"`.
        data (`str` or `dict`): a description of the training data, or `training.describe_data(...)`'s dict
            (`sources` = `[{"name", "path", "weight"}]`, `answer_style`, `eval_dataset`, ...).
        training_args (`transformers.TrainingArguments`, *optional*): schedule, batch, precision, seed.
        model_args (`trl.ModelConfig`, *optional*): starting checkpoint, LoRA / QLoRA settings.
        gv_args (*optional*): `GhostVisArguments` (preset, backbones, overrides, frozen towers, sample count).

    Returns:
        `str`: markdown for `model_card(..., origin=...)`.

    Example:
    ```python
    >>> from ghostvis_hf.hub import training_origin

    >>> data = {"sources": [{"name": "conversations", "path": "data/train.jsonl", "weight": 1.0}]}
    >>> print(training_origin("recipes/sft.py", "multimodal SFT", data).splitlines()[0])
    Trained with `recipes/sft.py` (multimodal SFT) on conversations (`data/train.jsonl`).

    ```
    """
    data_text = _describe_data(data)
    rows = [("recipe", f"`{recipe}` ({stage})"), ("data", data_text)]
    if gv_args is not None or model_args is not None:
        rows.append(("started from", _starting_point(model_args, gv_args)))
    rows += _method_rows(model_args, gv_args)
    if training_args is not None:
        rows += _schedule_rows(training_args)
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return f"Trained with `{recipe}` ({stage}) on {data_text}.\n\n## Training\n\n{table}\n"


def _describe_data(data) -> str:
    if not isinstance(data, dict):
        return str(data)
    parts = []
    for source in data.get("sources") or []:
        text = source["name"] + (f" (`{source['path']}`)" if source.get("path") else "")
        parts.append(text + (f" x{source['weight']:g}" if len(data["sources"]) > 1 and source.get("weight") else ""))
    text = " + ".join(parts) or "unknown data"
    extras = []
    for key, value in data.items():
        if key == "sources" or value in (None, "", [], {}):
            continue
        if isinstance(value, dict):  # e.g. answer_style per source
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        extras.append(f"{key.replace('_', ' ')} {value}")
    return text + (f"; {'; '.join(extras)}" if extras else "")


def _starting_point(model_args, gv_args) -> str:
    path = getattr(model_args, "model_name_or_path", None)
    if path:
        return f"checkpoint `{path}`"
    if getattr(gv_args, "text_model", None):
        return f"composed from `{gv_args.text_model}` and `{gv_args.vision_model}` (new resampler + projector)"
    preset = getattr(gv_args, "preset", None) or "?"
    overrides = getattr(gv_args, "config_overrides", None)
    return f"the `{preset}` preset, randomly initialised" + (f" (overrides `{overrides}`)" if overrides else "")


def _method_rows(model_args, gv_args) -> list[tuple[str, str]]:
    rows = []
    if getattr(model_args, "use_peft", False):
        bits = "QLoRA (4-bit base)" if model_args.load_in_4bit else "QLoRA (8-bit base)" if model_args.load_in_8bit \
            else "LoRA"
        rows.append(("method", f"{bits}, r={model_args.lora_r}, alpha={model_args.lora_alpha}, "
                               f"dropout={model_args.lora_dropout}"))
    elif model_args is not None:
        rows.append(("method", "full fine-tune of the unfrozen parameters"))
    if getattr(gv_args, "qat", None):
        rows.append(("quantization-aware training", f"{gv_args.qat}: the decoder's projections trained with int8 "
                     "fake-quantized weights (torchao QAT); saved in float, load with `--quantize int8`"))
    frozen = [name for name, flag in (("vision tower", getattr(gv_args, "freeze_vision_tower", False)),
                                      ("language model", getattr(gv_args, "freeze_language_model", False))) if flag]
    if frozen:
        rows.append(("frozen", ", ".join(frozen)))
    if getattr(gv_args, "num_train_samples", None):
        rows.append(("training rows", f"{gv_args.num_train_samples:,}"))
    return rows


def _schedule_rows(args) -> list[tuple[str, str]]:
    epochs = f"{args.num_train_epochs:g} epoch" + ("" if args.num_train_epochs == 1 else "s")
    length = f"{args.max_steps} steps" if args.max_steps and args.max_steps > 0 else epochs
    lr = f"{args.learning_rate:g} ({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}"
    lr += f", warmup {args.warmup_steps} steps)" if getattr(args, "warmup_steps", 0) else ")"
    batch = f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation"
    if getattr(args, "max_length", None):
        batch += f", max_length {args.max_length}" + (", packed" if getattr(args, "packing", False) else "")
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return [("length", length), ("learning rate", lr), ("weight decay", f"{args.weight_decay:g}"),
            ("batch", batch), ("precision", precision), ("seed", str(args.seed))]


def save_checkpoint(model, processor, out_dir: str, origin: str = "", base_models=()) -> str:
    """Saves weights (safetensors), config, generation config, processor, code files and a model card."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(model_card(model, repo=out_dir, origin=origin, base_models=base_models))
    return out_dir


def refuse_full_output_folder(parser, out: str, overwrite: bool) -> None:
    """`parser.error` (exit 2) when `out` is a folder that already holds files and `--overwrite` is not given:
    `ghostvis init` and `ghostvis compose` write new weights, which must not replace a trained checkpoint's."""
    if not overwrite and os.path.isdir(out) and os.listdir(out):
        parser.error(f"--out {out!r} already holds files (a checkpoint?); pass --overwrite to replace them")


def main_init(argv=None) -> int:
    """`ghostvis init --preset tiny --out DIR`: a randomly initialised checkpoint folder."""
    from . import create
    from .presets import PRESETS

    parser = argparse.ArgumentParser(prog="ghostvis init", description=main_init.__doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    refuse_full_output_folder(parser, args.out, args.overwrite)
    import torch

    torch.manual_seed(args.seed)
    model, processor = create(args.preset)
    save_checkpoint(model, processor, args.out, origin=f"Randomly initialised from the `{args.preset}` preset.")
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    return 0


# The files `save_pretrained` copies next to the weights for `trust_remote_code` (the Auto classes' modules).
CODE_FILES = ("configuration_ghostvis.py", "modeling_ghostvis.py", "processing_ghostvis.py", "image_utils_ghostvis.py")


def upgrade_code_files(folder: str) -> list[str]:
    """Replaces a checkpoint folder's GhostVis code files with this package's, leaving weights and configs alone.

    A folder saved before GhostVis followed transformers' renames (e.g. 5.24's `past_key_values` -> `cache`) carries
    code that newer transformers releases cannot run; this is the one-step fix. Each file is written to a temporary
    name and moved into place, so an interrupted upgrade leaves every file either old or new, never half-written.

    Args:
        folder: a local checkpoint folder (one with `config.json` and GhostVis's code files).

    Returns:
        The names of the files that changed.
    """
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder!r} is not a checkpoint folder (no config.json)")
    present = [name for name in CODE_FILES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise ValueError(f"{folder!r} has none of GhostVis's code files {CODE_FILES}: not a GhostVis checkpoint")
    here = os.path.dirname(os.path.abspath(__file__))
    changed = []
    for name in CODE_FILES:  # all of them: a newer file may import one an older checkpoint lacks
        new = open(os.path.join(here, name), "rb").read()
        target = os.path.join(folder, name)
        if os.path.isfile(target) and open(target, "rb").read() == new:
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(new)
        if os.path.isfile(target):
            shutil.copymode(target, tmp)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        changed.append(name)
    return changed


def main_upgrade(argv=None) -> int:
    """`ghostvis upgrade DIR [DIR ...]`: refresh the code files of checkpoint folders saved by an older GhostVis."""
    parser = argparse.ArgumentParser(prog="ghostvis upgrade", description=main_upgrade.__doc__)
    parser.add_argument("folders", nargs="+", help="checkpoint folders (local)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        changed = upgrade_code_files(folder)
        print(f"{folder}: " + (f"updated {', '.join(changed)}" if changed else "already current"))
    return 0
