"""VQAv2: one row per question; `answers` holds the 10 human answers (for the VQA accuracy metric), the target is
`multiple_choice_answer` (the consensus answer).

Local layout (as unpacked from visualqa.org):
```
root/v2_OpenEnded_mscoco_{train,val}2014_questions.json   # {"questions": [{"image_id", "question", "question_id"}]}
root/v2_mscoco_{train,val}2014_annotations.json           # {"annotations": [{"question_id", "answers": [{"answer"}],
                                                           #                   "multiple_choice_answer", ...}]}
root/{train,val}2014/COCO_{train,val}2014_{image_id:012d}.jpg
```
The json files may also sit in `root/questions/` and `root/annotations/`. The test splits have no public answers,
so only train/val are supported. Anything that is not a local folder goes through `datasets.load_dataset` (columns
`image`, `question`, `answers`, optionally `multiple_choice_answer`, as in the Hub copies of VQAv2).

Rows whose image file is missing or unreadable are skipped with one warning.
"""

import os
from functools import partial

import datasets

from .common import answer_texts, majority_answer, short_answer_row
from .loading import collect_rows, image_search_dirs, load_image_table, normalize_split, read_json


SOURCE = "vqav2"


def _find(root: str, file_name: str, subdirs: tuple[str, ...]) -> str:
    for d in ("", *subdirs):
        candidate = os.path.join(root, d, file_name)
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(root, file_name)  # read_json then raises naming the canonical location


def load_vqav2(
    path_or_hub_id: str,
    split: str = "train",
    image_root: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    check_images: bool = True,
    answer_style: str = "short",
) -> datasets.Dataset:
    """
    Load VQAv2 in the GhostVis conversational format.

    Args:
        path_or_hub_id (`str`):
            Root of the local VQAv2 layout, a `.parquet`/`.jsonl` file, or a Hub dataset id.
        split (`str`, defaults to `"train"`):
            `"train"` or `"val"` (`"validation"` is accepted) for the local layout; passed through for the Hub.
        image_root (`str`, *optional*):
            Where the COCO images are, if not under `path_or_hub_id` (the folder holding `{split}2014/` or that
            folder itself); VQAv2 reuses COCO 2014 images, so this is often a shared COCO folder.
        limit (`int`, *optional*):
            Keep at most this many rows (the first questions, in file order).
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
        target `multiple_choice_answer`, `answers` the 10 human answers, `question_type="vqa"`, `source="vqav2"`.
    """
    if not os.path.isdir(path_or_hub_id):
        return load_image_table(path_or_hub_id, split, name, ("image", "question", "answers"),
                                partial(_table_row, answer_style=answer_style), SOURCE, image_root, limit)

    split = normalize_split(split, ("train", "val"))
    questions = read_json(
        _find(path_or_hub_id, f"v2_OpenEnded_mscoco_{split}2014_questions.json", ("questions", "Questions")),
        f"VQAv2 questions (root/v2_OpenEnded_mscoco_{split}2014_questions.json)",
    )["questions"]
    annotations = read_json(
        _find(path_or_hub_id, f"v2_mscoco_{split}2014_annotations.json", ("annotations", "Annotations")),
        f"VQAv2 annotations (root/v2_mscoco_{split}2014_annotations.json)",
    )["annotations"]
    by_question = {ann["question_id"]: ann for ann in annotations}

    search_dirs = image_search_dirs(path_or_hub_id, image_root, f"{split}2014")

    def to_row(q, path):
        ann = by_question.get(q["question_id"])
        if ann is None:
            return None
        answers, target = _answers_and_target(ann)
        return short_answer_row(path, q["question"], target, answers, "vqa", SOURCE, answer_style)

    return collect_rows(
        questions, lambda q: f"COCO_{split}2014_{q['image_id']:012d}.jpg", search_dirs, to_row,
        lambda q: f"question {q['question_id']} has no annotation", SOURCE, limit, check_images,
    )


def _answers_and_target(annotation: dict) -> tuple[list[str], str]:
    """The human answers, and the target: `multiple_choice_answer`, else the majority answer."""
    answers = answer_texts(annotation["answers"])
    return answers, annotation.get("multiple_choice_answer") or majority_answer(answers)


def _table_row(record: dict, image, answer_style: str = "short") -> dict | None:
    answers, target = _answers_and_target(record)
    if not target:
        return None
    return short_answer_row(image, record["question"], target, answers, "vqa", SOURCE, answer_style)
