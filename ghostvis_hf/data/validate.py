"""Finds bad training rows before training starts (never hours into a run).

A row is bad when an image is missing or unreadable, when its `{"type": "image"}` parts (the `<image>` markers)
don't match its images one to one, or when truncation to `max_length` would cut through (or drop) an image's
placeholder run. Policy `"skip"` drops such rows and logs a count per reason; `"error"` refuses the dataset with a
message naming the first bad row. Over-long text *after* the last image is not bad: the collator truncates it.
"""

import logging
from collections import Counter

logger = logging.getLogger("ghostvis")
POLICIES = ("skip", "error")


def _image_problem(row):
    """What is wrong with a row's images (count, missing, unreadable), or None."""
    from ..processing_ghostvis import to_rgb_image

    images = row.get("images") or []
    n_markers = sum(
        1 for m in row["messages"] if isinstance(m["content"], list)
        for part in m["content"] if part.get("type") == "image"
    )
    if n_markers != len(images):
        return "image_count_mismatch", f"{n_markers} <image> markers but {len(images)} images"
    for k, image in enumerate(images):
        if image is None:
            return "missing_image", f"image {k} is missing"
        try:
            to_rgb_image(image, where=f"image {k}")
        except ValueError as e:
            return "unreadable_image", str(e)
    return None


def _batch_problems(rows, processor, max_length):
    """`_image_problem` of each row, then (tokenizing the rest in one batch) whether truncation would cut an image."""
    problems = [_image_problem(row) for row in rows]
    if max_length is None:
        return problems
    todo = [i for i, (row, p) in enumerate(zip(rows, problems)) if p is None and row.get("images")]
    if not todo:
        return problems
    # Token positions without running the image processor: each <image> marker grows into N + 2 tokens.
    texts = [processor.apply_chat_template(rows[i]["messages"]) for i in todo]
    grow = processor.num_image_tokens + 1
    for i, ids in zip(todo, processor.tokenizer(texts)["input_ids"]):
        markers = [j for j, t in enumerate(ids) if t == processor.image_marker_id]
        last_image_end = markers[-1] + 1 + grow * len(markers)
        if last_image_end > max_length:
            problems[i] = ("image_cut_by_truncation",
                           f"an image's placeholder run ends at token {last_image_end}, past max_length={max_length}")
    return problems


def validate_rows(dataset, processor, max_length: int | None = None, policy: str = "skip", batch_size: int = 1000):
    """Checks every row; returns `(clean_dataset, report)` where report counts the skipped rows per reason.

    Args:
        dataset (`datasets.Dataset`): rows with `messages` and `images`.
        processor (`GhostVisProcessor`): to count tokens exactly as the collator will.
        max_length (`int`, *optional*): the training `max_length`.
        policy (`str`): `"skip"` or `"error"`.
        batch_size (`int`, *optional*, defaults to 1000): rows read and tokenized together.
    """
    if policy not in POLICIES:
        raise ValueError(f"bad_rows={policy!r} is not supported; allowed: {list(POLICIES)}")
    keep, reasons = [], Counter()
    i = 0
    for batch in dataset.iter(batch_size=batch_size):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for problem in _batch_problems(rows, processor, max_length):
            if problem is None:
                keep.append(i)
            else:
                reason, detail = problem
                if policy == "error":
                    raise ValueError(
                        f"Bad training row {i} ({reason}): {detail}. Fix or drop it, or pass --bad_rows skip"
                    )
                reasons[reason] += 1
            i += 1
    if reasons:
        logger.warning("skipped %d bad rows of %d: %s", sum(reasons.values()), len(dataset), dict(reasons))
        dataset = dataset.select(keep)
    return dataset, {"checked": len(keep) + sum(reasons.values()), "skipped": dict(reasons)}
