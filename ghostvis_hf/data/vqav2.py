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

    Returns:
        `datasets.Dataset`: Rows with prompt `"{question}\\nAnswer the question using a single word or phrase."`,
        target `multiple_choice_answer`, `answers` the 10 human answers, `question_type="vqa"`, `source="vqav2"`.
    """
    if not os.path.isdir(path_or_hub_id):
        return _load_table(path_or_hub_id, split, image_root, limit, name)

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
    collector = RowCollector(SOURCE, limit=limit, check_images=check_images)
    for q in questions:
        if collector.full:
            break
        ann = by_question.get(q["question_id"])
        if ann is None:
            collector.skip(f"question {q['question_id']} has no annotation")
            continue
        answers = answer_texts(ann["answers"])
        target = ann.get("multiple_choice_answer") or majority_answer(answers)
        path = resolve_image_path(f"COCO_{split}2014_{q['image_id']:012d}.jpg", search_dirs)
        prompt = f"{q['question']}\n{SHORT_ANSWER_PROMPT}"
        collector.add([path], build_vqa_row([path], prompt, target, answers, "vqa", SOURCE))
    return collector.to_dataset()


def _load_table(path_or_hub_id, split, image_root, limit, name) -> datasets.Dataset:
    table = load_table(path_or_hub_id, split, name)
    missing = {"image", "question", "answers"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path_or_hub_id!r} lacks columns {sorted(missing)} (has {table.column_names}).")

    def to_row(record):
        answers = answer_texts(record["answers"])
        target = record.get("multiple_choice_answer") or majority_answer(answers)
        if not target:
            return None
        prompt = f"{record['question']}\n{SHORT_ANSWER_PROMPT}"
        return build_vqa_row([record["image"]], prompt, target, answers, "vqa", SOURCE)

    return convert_table(table, to_row, SOURCE, image_column="image", image_root=image_root, limit=limit)
