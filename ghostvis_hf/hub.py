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


def save_checkpoint(model, processor, out_dir: str, origin: str = "", base_models=()) -> str:
    """Saves weights (safetensors), config, generation config, processor, code files and a model card."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(model_card(model, repo=out_dir, origin=origin, base_models=base_models))
    return out_dir


def main_init(argv=None) -> int:
    """`ghostvis init --preset tiny --out DIR`: a randomly initialised checkpoint folder."""
    from . import create
    from .presets import PRESETS

    parser = argparse.ArgumentParser(prog="ghostvis init", description=main_init.__doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
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
