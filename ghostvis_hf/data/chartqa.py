"""ChartQA: questions about chart images; human-written and machine-generated ("augmented") questions are two
subsets that papers report separately, so `subsets` selects them.

Local layout (the "ChartQA Dataset" folder of the official release):
```
root/{train,val,test}/{split}_human.json       # [{"imgname", "query", "label"}]
root/{train,val,test}/{split}_augmented.json
root/{train,val,test}/png/{imgname}
```
Anything that is not a local folder goes through `datasets.load_dataset` (columns `image`, `query`, `label`, where
`label` may be a string or a list of strings, as in `HuggingFaceM4/ChartQA`).

Rows whose image file is missing or unreadable are skipped with one warning. RGBA chart PNGs are decoded to RGB by
the `Image(mode="RGB")` feature, which drops alpha like LLaVA's `convert("RGB")` (see `common.py`).
"""

import os
from collections.abc import Sequence
from functools import partial

import datasets

from .common import short_answer_row
from .loading import collect_rows, image_search_dirs, load_image_table, normalize_split, read_json


SOURCE = "chartqa"
SUBSETS = ("human", "augmented")


def _labels(label) -> list[str]:
    labels = label if isinstance(label, list) else [label]
    # Labels are often JSON numbers; the schema stores text (relaxed numeric matching is the metric's job).
    return [str(x).strip() for x in labels if x is not None and str(x).strip()]


def load_chartqa(
    path_or_hub_id: str,
    split: str = "train",
    image_root: str | None = None,
    limit: int | None = None,
    subsets: Sequence[str] = SUBSETS,
    name: str | None = None,
    check_images: bool = True,
    answer_style: str = "short",
) -> datasets.Dataset:
    """
    Load ChartQA in the GhostVis conversational format.

    Args:
        path_or_hub_id (`str`):
            The local `ChartQA Dataset` folder, a `.parquet`/`.jsonl` file, or a Hub dataset id.
        split (`str`, defaults to `"train"`):
            `"train"`, `"val"` (`"validation"` is accepted) or `"test"`.
        image_root (`str`, *optional*):
            Where the chart PNGs are, if not in `root/{split}/png/` (the folder holding `png/` or that folder itself).
        limit (`int`, *optional*):
            Keep at most this many rows (human questions first, then augmented ones).
        subsets (`Sequence[str]`, defaults to `("human", "augmented")`):
            Which question files to read (local layout only).
        name (`str`, *optional*):
            Hub configuration name.
        check_images (`bool`, defaults to `True`):
            Open each image header to skip corrupt files (otherwise only existence is checked).
        answer_style (`str`, defaults to `"short"`):
            `"short"` appends "Answer the question using a single word or phrase." to each question (LLaVA's VQA
            prompt); `"none"` keeps the question as written. Evaluate with the setting you trained with.

    Returns:
        `datasets.Dataset`: Rows with prompt `"{query}\\nAnswer the question using a single word or phrase."`
        (`answer_style="short"`),
        target the label, `answers=[label]`, `question_type="chartqa"`, `source="chartqa"`.
    """
    row = partial(_row, answer_style=answer_style)
    if not os.path.isdir(path_or_hub_id):
        return load_image_table(path_or_hub_id, split, name, ("image", "query", "label"), row, SOURCE,
                                image_root, limit)

    split = normalize_split(split, ("train", "val", "test"))
    bad = [s for s in subsets if s not in SUBSETS]
    if bad or not subsets:
        raise ValueError(f"Unknown ChartQA subsets {list(subsets)}; choose from {SUBSETS}.")
    split_dir = os.path.join(path_or_hub_id, split)
    search_dirs = image_search_dirs(split_dir, image_root, "png")
    # Every file is read up front: a missing one is refused even when `limit` is reached before it.
    records = []
    for subset in subsets:
        file_name = f"{split}_{subset}.json"
        records += read_json(os.path.join(split_dir, file_name), f"ChartQA questions (root/{split}/{file_name})")
    return collect_rows(
        records, lambda r: r["imgname"], search_dirs, row, lambda r: f"{r.get('imgname')} has no label", SOURCE,
        limit, check_images,
    )


def _row(record: dict, image, answer_style: str = "short") -> dict | None:
    """The row of one question (target: its first label), or None when it has no label."""
    answers = _labels(record.get("label"))
    if not answers:
        return None
    return short_answer_row(image, record["query"], answers[0], answers, "chartqa", SOURCE, answer_style)
