"""COCO Captions: one row per image, all reference captions in `answers`, the first one as the training target.

Local layout (as unpacked from cocodataset.org):
```
root/annotations/captions_{train,val}2017.json   # {"images": [{"id", "file_name"}],
                                                 #  "annotations": [{"image_id", "caption"}]}
root/{train,val}2017/000000000009.jpg
```
Anything else (a Hub id, a `.parquet`/`.jsonl` file) goes through `datasets.load_dataset`; the caption column is
the first of `sentences`, `captions`, `caption`, `sentences_raw`, `text` present.

Rows whose image file is missing or unreadable, or whose image has no caption, are skipped with one warning.
"""

import os

import datasets

from .common import build_vqa_row
from .loading import collect_rows, convert_table, image_search_dirs, load_table, normalize_split, read_json


PROMPT = "Describe the image briefly."
SOURCE = "coco_captions"
CAPTION_COLUMNS = ("sentences", "captions", "caption", "sentences_raw", "text")
IMAGE_COLUMNS = ("image", "images", "image_path", "file_name", "filepath")


def _caption_text(value) -> str:
    # Hub variants store captions as plain strings or as {"raw": ...} / {"caption": ...} dicts.
    if isinstance(value, dict):
        value = value.get("raw") or value.get("caption") or value.get("text") or ""
    return str(value).strip()


def load_coco_captions(
    path_or_hub_id: str,
    split: str = "train",
    image_root: str | None = None,
    limit: int | None = None,
    year: str = "2017",
    name: str | None = None,
    check_images: bool = True,
) -> datasets.Dataset:
    """
    Load COCO Captions in the GhostVis conversational format.

    Args:
        path_or_hub_id (`str`):
            Root of the local COCO layout, a `.parquet`/`.jsonl` file, or a Hub dataset id.
        split (`str`, defaults to `"train"`):
            `"train"` or `"val"` (`"validation"` is accepted) for the local layout; passed through for the Hub.
        image_root (`str`, *optional*):
            Where the images are, if not under `path_or_hub_id` (either the folder holding `{split}{year}/` or that
            folder itself). For tables, relative image paths are resolved against it.
        limit (`int`, *optional*):
            Keep at most this many rows (the first ones, in annotation-file order).
        year (`str`, defaults to `"2017"`):
            COCO release year in the file names (`"2014"` for the older release).
        name (`str`, *optional*):
            Hub configuration name.
        check_images (`bool`, defaults to `True`):
            Open each image header to skip corrupt files (otherwise only existence is checked).

    Returns:
        `datasets.Dataset`: One row per image: prompt `"Describe the image briefly."`, target the first caption,
        `answers` all captions, `question_type="caption"`, `source="coco_captions"`.
    """
    if not os.path.isdir(path_or_hub_id):
        return _load_table(path_or_hub_id, split, image_root, limit, name)

    split = normalize_split(split, ("train", "val"))
    annotations = read_json(
        os.path.join(path_or_hub_id, "annotations", f"captions_{split}{year}.json"),
        f"COCO captions annotations (root/annotations/captions_{split}{year}.json)",
    )
    captions: dict[int, list[str]] = {}
    for ann in annotations["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())

    search_dirs = image_search_dirs(path_or_hub_id, image_root, f"{split}{year}")
    return collect_rows(
        annotations["images"], lambda image: image["file_name"], search_dirs,
        lambda image, path: _row([path], captions.get(image["id"])),
        lambda image: f"image id {image['id']} has no caption", SOURCE, limit, check_images,
    )


def _row(images: list, refs: list[str] | None) -> dict | None:
    """The row of one image (target: the first caption), or None when it has no caption."""
    return build_vqa_row(images, PROMPT, refs[0], refs, "caption", SOURCE) if refs else None


def _load_table(path_or_hub_id, split, image_root, limit, name) -> datasets.Dataset:
    table = load_table(path_or_hub_id, split, name)
    caption_column = next((c for c in CAPTION_COLUMNS if c in table.column_names), None)
    image_column = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if caption_column is None or image_column is None:
        raise ValueError(
            f"{path_or_hub_id!r} has columns {table.column_names}; expected an image column (one of {IMAGE_COLUMNS}) "
            f"and a caption column (one of {CAPTION_COLUMNS})."
        )

    def to_row(record):
        refs = record[caption_column]
        refs = [_caption_text(c) for c in (refs if isinstance(refs, list) else [refs])]
        refs = [c for c in refs if c]
        images = record[image_column] if isinstance(record[image_column], list) else [record[image_column]]
        return _row(images, refs)

    return convert_table(table, to_row, SOURCE, image_column=image_column, image_root=image_root, limit=limit)
