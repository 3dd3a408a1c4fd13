"""Finds bad training rows before training starts (never hours into a run), and keeps one count of them.

A row is bad when an image is missing, is not an image, or does not decode in full (a truncated file with a readable
header), when its `{"type": "image"}` parts (the `<image>` markers) don't match its images one to one, or when
truncation to `max_length` would cut through (or drop) an image's placeholder run. Over-long text *after* the last
image is not bad: the collator truncates it.

One policy (`--bad_rows`) covers every row dropped on the way, by a loader or by `validate_rows`: `"error"` refuses at
the first bad row, naming it and the reason; `"skip"` drops each and counts it per reason, with the first example of
each. Loaders drop rows whose image file is missing or unreadable, or that have no answer; inside
`recording_bad_rows(policy)` each such row goes to the record it yields, and `training.data` hands that record, with
the training set, to `validate_rows`, whose report (what the recipes log and write to their summary) counts both.
"""

import io
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

logger = logging.getLogger("ghostvis")
POLICIES = ("skip", "error")
# The attribute under which `training.data` passes the loaders' record on to `validate_rows` with the training set.
DROPPED_AT_LOAD = "ghostvis_dropped_at_load"


class BadRows:
    """The bad rows of one data set under one policy: `"error"` raises at the first, `"skip"` counts each per reason.

    Args:
        policy (`str`): `"skip"` or `"error"`.
        parent (`BadRows`, *optional*): a record every row is passed on to first (a loader's own record passes its
            rows to the active `recording_bad_rows` one, which raises under `"error"`).
    """

    def __init__(self, policy: str = "skip", parent: "BadRows | None" = None):
        if policy not in POLICIES:
            raise ValueError(f"bad_rows={policy!r} is not supported; allowed: {list(POLICIES)}")
        self.policy, self.parent = policy, parent
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}  # reason -> "row ...: detail" of its first row

    def add(self, row: str, reason: str, detail: str, n: int = 1) -> None:
        """A bad row: `row` names it (`"3"`, `"3 of vqav2"`), `reason` is its count key, `detail` says what is wrong;
        `n` > 1 counts that many rows of one reason at once, `row` being the first."""
        if self.parent is not None:
            self.parent.add(row, reason, detail, n)
        if self.policy == "error":
            raise ValueError(f"Bad training row {row} ({reason}): {detail}. Fix or drop it, or pass --bad_rows skip")
        self.counts[reason] += n
        self.first.setdefault(reason, f"row {row}: {detail}")

    def update(self, other: "BadRows") -> None:
        """Takes over `other`'s rows (under `"error"`, refuses the first of them)."""
        for reason, first in other.first.items():
            if self.policy == "error":
                raise ValueError(f"Bad training {first} ({reason}). Fix or drop it, or pass --bad_rows skip")
            self.counts[reason] += other.counts[reason]
            self.first.setdefault(reason, first)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def log(self, what: str, of: int | None = None, to: logging.Logger = logger) -> None:
        """One warning with the count per reason and the first row of each (nothing when no row was bad)."""
        if self.counts:
            firsts = "; ".join(f"{reason}: {self.first[reason]}" for reason in self.by_reason)
            to.warning("%s: skipped %d row(s)%s %s (first of each: %s)", what, self.total,
                       "" if of is None else f" of {of}", self.by_reason, firsts)


_ACTIVE: ContextVar[BadRows | None] = ContextVar("ghostvis_bad_rows", default=None)


@contextmanager
def recording_bad_rows(policy: str) -> Iterator[BadRows]:
    """Within the block, every row a loader drops goes to the yielded record: refused under `"error"`, counted under
    `"skip"`. Outside one (evaluation), loaders skip such rows and only log them."""
    token = _ACTIVE.set(BadRows(policy))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def loader_record() -> BadRows:
    """A loader's own record of the rows it drops (for its warning), passing each on to the active one, if any."""
    return BadRows("skip", parent=_ACTIVE.get())


def _one_image_problem(image, where: str):
    """Why one image (undecoded: `{"bytes", "path"}`, bytes, a path, a PIL image ...) cannot be used, or None. It is
    decoded in full: a file cut short behind a readable header fails here, not in the middle of training."""
    from PIL import Image

    from ..processing_ghostvis import to_rgb_image

    source = image.get("bytes") or image.get("path") if isinstance(image, dict) else image
    is_path = isinstance(source, str) and not source.startswith(("data:", "http://", "https://"))
    if source is None or (is_path and not os.path.isfile(source)):
        return "missing_image", f"{where}: no such image file" if source else f"{where} is missing"
    try:
        to_rgb_image(image, where=where)
        return None
    except ValueError as e:
        try:  # a readable header: the pixel data is cut short or corrupt
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source):
                return "corrupt_image", str(e)
        except Exception:
            return "unreadable_image", str(e)


def _image_problem(row):
    """What is wrong with a row's images (count, missing, unreadable, corrupt), or None."""
    images = row.get("images") or []
    n_markers = sum(
        1 for m in row["messages"] if isinstance(m["content"], list)
        for part in m["content"] if part.get("type") == "image"
    )
    if n_markers != len(images):
        return "image_count_mismatch", f"{n_markers} <image> markers but {len(images)} images"
    for k, image in enumerate(images):
        path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
        if problem := _one_image_problem(image, f"image {k}" + (f" ({path!r})" if path else "")):
            return problem
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
    """Checks every row; returns `(clean_dataset, report)`.

    The report counts the skipped rows per reason, those the loaders dropped (the record `training.data` attaches
    under `DROPPED_AT_LOAD`) included: `{"checked": rows loaded, "skipped": {reason: n}, "first": {reason: example}}`.

    Args:
        dataset (`datasets.Dataset`): rows with `messages` and `images`.
        processor (`GhostVisProcessor`): to count tokens exactly as the collator will.
        max_length (`int`, *optional*): the training `max_length`.
        policy (`str`): `"skip"` or `"error"`.
        batch_size (`int`, *optional*, defaults to 1000): rows read and tokenized together.
    """
    bad = BadRows(policy)
    dropped_at_load = getattr(dataset, DROPPED_AT_LOAD, None)
    if dropped_at_load is not None:
        bad.update(dropped_at_load)
    keep, i = [], 0
    # Arrow format: images stay undecoded `{"bytes", "path"}` so each is decoded here, where a failure names its row.
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        for problem in _batch_problems(batch.to_pylist(), processor, max_length):
            if problem is None:
                keep.append(i)
            else:
                bad.add(str(i), *problem)
            i += 1
    bad.log("bad rows", of=i + (dropped_at_load.total if dropped_at_load is not None else 0))
    if len(keep) < i:
        dataset = dataset.select(keep)
    return dataset, {"checked": len(keep) + bad.total, "skipped": bad.by_reason,
                     "first": {reason: bad.first[reason] for reason in bad.by_reason}}
