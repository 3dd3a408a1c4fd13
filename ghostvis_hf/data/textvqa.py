"""TextVQA: questions that need reading text in the image; `answers` holds the 10 human answers and the target is
the most frequent one.

Local layout (as released on textvqa.org):
```
root/TextVQA_0.5.1_{train,val,test}.json   # {"data": [{"question_id", "question", "image_id", "answers": [10 str]}]}
root/train_images/{image_id}.jpg           # train AND val images (the val split reuses train_images/)
root/test_images/{image_id}.jpg
```
The test split has no public answers, so its rows are skipped (with the usual warning). Anything that is not a local
folder goes through `datasets.load_dataset` (columns `image`, `question`, `answers`).

Rows whose image file is missing or unreadable are skipped with one warning.
"""

import os

import datasets

from .common import (
    SHORT_ANSWER_PROMPT,
    RowCollector,
    answer_texts,
    build_vqa_row,
    convert_table,
    image_search_dirs,
    load_table,
    majority_answer,
    normalize_split,
    read_json,
    resolve_image_path,
)


SOURCE = "textvqa"
VERSION = "0.5.1"


def load_textvqa(
    path_or_hub_id: str,
    split: str = "train",
    image_root: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    check_images: bool = True,
) -> datasets.Dataset:
    """
    Load TextVQA in the GhostVis conversational format.

    Args:
        path_or_hub_id (`str`):
            Root of the local TextVQA layout, a `.parquet`/`.jsonl` file, or a Hub dataset id.
        split (`str`, defaults to `"train"`):
            `"train"`, `"val"` (`"validation"` is accepted) or `"test"` (no answers) for the local layout.
        image_root (`str`, *optional*):
            Where the images are, if not under `path_or_hub_id` (the folder holding `train_images/` or that folder
            itself).
        limit (`int`, *optional*):
            Keep at most this many rows.
        name (`str`, *optional*):
            Hub configuration name.
        check_images (`bool`, defaults to `True`):
            Open each image header to skip corrupt files (otherwise only existence is checked).

    Returns:
        `datasets.Dataset`: Rows with prompt `"{question}\\nAnswer the question using a single word or phrase."`,
        target the majority answer, `answers` the 10 human answers, `question_type="textvqa"`, `source="textvqa"`.
    """
    if not os.path.isdir(path_or_hub_id):
        return _load_table(path_or_hub_id, split, image_root, limit, name)

    split = normalize_split(split, ("train", "val", "test"))
    file_name = f"TextVQA_{VERSION}_{split}.json"
    records = read_json(os.path.join(path_or_hub_id, file_name), f"TextVQA annotations (root/{file_name})")["data"]

    search_dirs = image_search_dirs(path_or_hub_id, image_root, "test_images" if split == "test" else "train_images")
    collector = RowCollector(SOURCE, limit=limit, check_images=check_images)
    for record in records:
        if collector.full:
            break
        answers = answer_texts(record.get("answers"))
        if not answers:
            collector.skip(f"question {record.get('question_id')} has no answers")
            continue
        path = resolve_image_path(f"{record['image_id']}.jpg", search_dirs)
        prompt = f"{record['question']}\n{SHORT_ANSWER_PROMPT}"
        target = majority_answer(answers)
        collector.add([path], build_vqa_row([path], prompt, target, answers, "textvqa", SOURCE))
    return collector.to_dataset()


def _load_table(path_or_hub_id, split, image_root, limit, name) -> datasets.Dataset:
    table = load_table(path_or_hub_id, split, name)
    missing = {"image", "question", "answers"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path_or_hub_id!r} lacks columns {sorted(missing)} (has {table.column_names}).")

    def to_row(record):
        answers = answer_texts(record["answers"])
        if not answers:
            return None
        prompt = f"{record['question']}\n{SHORT_ANSWER_PROMPT}"
        return build_vqa_row([record["image"]], prompt, majority_answer(answers), answers, "textvqa", SOURCE)

    return convert_table(table, to_row, SOURCE, image_column="image", image_root=image_root, limit=limit)
