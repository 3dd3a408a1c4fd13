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

import datasets

from .common import (
    SHORT_ANSWER_PROMPT,
    RowCollector,
    build_vqa_row,
    convert_table,
    image_search_dirs,
    load_table,
    normalize_split,
    read_json,
    resolve_image_path,
)


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

    Returns:
        `datasets.Dataset`: Rows with prompt `"{query}\\nAnswer the question using a single word or phrase."`,
        target the label, `answers=[label]`, `question_type="chartqa"`, `source="chartqa"`.
    """
    if not os.path.isdir(path_or_hub_id):
        return _load_table(path_or_hub_id, split, image_root, limit, name)

    split = normalize_split(split, ("train", "val", "test"))
    bad = [s for s in subsets if s not in SUBSETS]
    if bad or not subsets:
        raise ValueError(f"Unknown ChartQA subsets {list(subsets)}; choose from {SUBSETS}.")
    split_dir = os.path.join(path_or_hub_id, split)
    search_dirs = image_search_dirs(split_dir, image_root, "png")
    collector = RowCollector(SOURCE, limit=limit, check_images=check_images)
    for subset in subsets:
        file_name = f"{split}_{subset}.json"
        records = read_json(os.path.join(split_dir, file_name), f"ChartQA questions (root/{split}/{file_name})")
        for record in records:
            if collector.full:
                break
            answers = _labels(record.get("label"))
            if not answers:
                collector.skip(f"{record.get('imgname')} has no label")
                continue
            path = resolve_image_path(record["imgname"], search_dirs)
            prompt = f"{record['query']}\n{SHORT_ANSWER_PROMPT}"
            collector.add([path], build_vqa_row([path], prompt, answers[0], answers, "chartqa", SOURCE))
    return collector.to_dataset()


def _load_table(path_or_hub_id, split, image_root, limit, name) -> datasets.Dataset:
    table = load_table(path_or_hub_id, split, name)
    missing = {"image", "query", "label"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path_or_hub_id!r} lacks columns {sorted(missing)} (has {table.column_names}).")

    def to_row(record):
        answers = _labels(record["label"])
        if not answers:
            return None
        prompt = f"{record['query']}\n{SHORT_ANSWER_PROMPT}"
        return build_vqa_row([record["image"]], prompt, answers[0], answers, "chartqa", SOURCE)

    return convert_table(table, to_row, SOURCE, image_column="image", image_root=image_root, limit=limit)
