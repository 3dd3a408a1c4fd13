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
from functools import partial

import datasets

from .common import answer_texts, majority_answer, short_answer_row
from .loading import collect_rows, image_search_dirs, load_image_table, normalize_split, read_json


SOURCE = "textvqa"
VERSION = "0.5.1"


def load_textvqa(
    path_or_hub_id: str,
    split: str = "train",
    image_root: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    check_images: bool = True,
    answer_style: str = "short",
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
        answer_style (`str`, defaults to `"short"`):
            `"short"` appends "Answer the question using a single word or phrase." to each question (LLaVA's VQA
            prompt); `"none"` keeps the question as written. Evaluate with the setting you trained with.

    Returns:
        `datasets.Dataset`: Rows with prompt `"{question}\\nAnswer the question using a single word or phrase."`
        (`answer_style="short"`),
        target the majority answer, `answers` the 10 human answers, `question_type="textvqa"`, `source="textvqa"`.
    """
    row = partial(_row, answer_style=answer_style)
    if not os.path.isdir(path_or_hub_id):
        return load_image_table(path_or_hub_id, split, name, ("image", "question", "answers"), row, SOURCE,
                                image_root, limit)

    split = normalize_split(split, ("train", "val", "test"))
    file_name = f"TextVQA_{VERSION}_{split}.json"
    records = read_json(os.path.join(path_or_hub_id, file_name), f"TextVQA annotations (root/{file_name})")["data"]

    search_dirs = image_search_dirs(path_or_hub_id, image_root, "test_images" if split == "test" else "train_images")
    return collect_rows(
        records, lambda r: f"{r['image_id']}.jpg", search_dirs, row,
        lambda r: f"question {r.get('question_id')} has no answers", SOURCE, limit, check_images,
    )


def _row(record: dict, image, answer_style: str = "short") -> dict | None:
    """The row of one question (target: the majority answer), or None when it has no answers."""
    answers = answer_texts(record.get("answers"))
    if not answers:
        return None
    return short_answer_row(image, record["question"], majority_answer(answers), answers, "textvqa", SOURCE,
                            answer_style)
