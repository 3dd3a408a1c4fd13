"""Shared pieces of every GhostVis data source: the Arrow schema, row building and image-path checks.

Every loader in `ghostvis_hf.data` returns a `datasets.Dataset` with exactly the columns of `FEATURES`, in TRL's
conversational vision format (`images` + `messages` whose `content` is always a list of `{"type", "text"}` parts),
plus three metadata columns for evaluation (`answers`, `question_type`, `source`). Sharing one explicit schema is
what lets `mix_datasets` concatenate a text-only set with a vision set: without it, an all-`[]` `images` column
is inferred as `list<null>` and Arrow refuses to concatenate it with `list<image>`.

Adapters for real datasets keep images as *paths* (the `Image` feature decodes them lazily on access), so loading
COCO's 118k images costs a directory walk, not a decode + re-encode of every file. `Image(mode="RGB")` converts
grayscale / palette / RGBA files to RGB when they are decoded. NOTE: for RGBA that is PIL's `convert("RGB")`, which
drops alpha (as LLaVA's loaders do), so fully transparent pixels show their stored colour; flattening onto white
(`to_rgb_image`, what the processor does at inference) would need a decode + re-encode of every such image at load
time.

Missing or unreadable images: rows whose image file does not exist, or whose header PIL cannot parse, are
skipped, and one warning with the number skipped is logged per load (see `RowCollector`).
"""

import json
import logging
import os
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import datasets
import numpy as np
from datasets import Features, Image, List, Value
from datasets.table import InMemoryTable
from PIL import Image as PILImage

from ..processing_ghostvis import to_rgb_image  # the one RGB conversion; the processor file must stay self-contained


logger = logging.getLogger(__name__)

FEATURES = Features(
    {
        "images": List(Image(mode="RGB")),
        "messages": List(
            {
                "role": Value("string"),
                "content": List({"type": Value("string"), "text": Value("string")}),
            }
        ),
        "answers": List(Value("string")),
        "question_type": Value("string"),
        "source": Value("string"),
    }
)

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


def is_readable_image(path: str) -> bool:
    """Cheap check that `path` exists and PIL recognises its header (pixel data is not decoded)."""
    if not os.path.isfile(path):
        return False
    try:
        with PILImage.open(path):
            return True
    except (OSError, SyntaxError, ValueError):
        return False


def resolve_image_path(file_name: str, search_dirs: Iterable[str]) -> str:
    """
    Absolute path of `file_name` in the first of `search_dirs` that has it (else in the first dir, so the missing-file
    warning names a sensible path). Absolute `file_name`s are returned as they are.
    """
    if os.path.isabs(file_name):
        return file_name
    candidates = [os.path.abspath(os.path.join(d, file_name)) for d in search_dirs]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    return candidates[0] if candidates else os.path.abspath(file_name)



def normalize_split(split: str, allowed: Iterable[str]) -> str:
    """
    Map split aliases (`validation` -> `val`) and check the split is one the source ships.

    Args:
        split (`str`):
            Requested split.
        allowed (`Iterable[str]`):
            Split names the source uses on disk.

    Returns:
        `str`: The on-disk split name.
    """
    allowed = tuple(allowed)
    name = SPLIT_ALIASES.get(split, split)
    if name not in allowed:
        raise ValueError(f"Unknown split {split!r}; allowed: {allowed} (or 'validation' for 'val').")
    return name


def read_json(path: str, what: str) -> Any:
    """
    Read a JSON annotation file, with an error that says which file of which layout was expected.

    Args:
        path (`str`):
            JSON file to read.
        what (`str`):
            Human-readable description of the expected layout, used in the error.

    Returns:
        `Any`: The parsed JSON.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expected {what} at {path!r}, but there is no such file.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def image_search_dirs(root: str, image_root: str | None, subdir: str) -> list[str]:
    """Where to look for images: `image_root/subdir` then `image_root` when given, else `root/subdir`."""
    if image_root is not None:
        return [os.path.join(image_root, subdir), image_root]
    return [os.path.join(root, subdir)]


def answer_texts(answers: list | None) -> list[str]:
    """Reference answers as strings: VQA files hold `{"answer": ...}` dicts, other sources plain strings/numbers."""
    return [str(a["answer"] if isinstance(a, dict) else a).strip() for a in answers or []]


def majority_answer(answers: list[str]) -> str:
    """Most frequent answer, ties broken by first occurrence (the usual VQA training target)."""
    counts = Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a))) if answers else ""


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part() -> dict[str, Any]:
    # "text": None keeps the part keys identical across rows, so Arrow infers one struct type for all parts.
    return {"type": "image", "text": None}


def build_vqa_row(
    images: list,
    question: str,
    answer: str,
    answers: list[str] | None = None,
    question_type: str = "vqa",
    source: str = "unknown",
) -> dict[str, Any]:
    """
    Build one single-turn row: the user turn holds one image placeholder per image followed by the question.

    Args:
        images (`list`):
            PIL images, image paths, or `{"bytes", "path"}` dicts, in the order their placeholders appear.
        question (`str`):
            User prompt text.
        answer (`str`):
            Assistant target text.
        answers (`list[str]`, *optional*):
            Reference answers for evaluation. Defaults to `[answer]`.
        question_type (`str`, defaults to `"vqa"`):
            Question category used to break down evaluation metrics.
        source (`str`, defaults to `"unknown"`):
            Name of the data source.

    Returns:
        `dict[str, Any]`: A row matching `FEATURES`.
    """
    return {
        "images": list(images),
        "messages": [
            {"role": "user", "content": [image_part() for _ in images] + [text_part(question)]},
            {"role": "assistant", "content": [text_part(answer)]},
        ],
        "answers": list(answers) if answers is not None else [answer],
        "question_type": question_type,
        "source": source,
    }


def rows_to_dataset(rows: list[dict[str, Any]] | dict[str, list], encoded: bool = False) -> datasets.Dataset:
    """
    Turn rows (or an already columnar dict) into a `datasets.Dataset` with the shared `FEATURES` schema.

    Args:
        rows (`list[dict]` or `dict[str, list]`):
            Rows built with `build_vqa_row` (or columns of them).
        encoded (`bool`, defaults to `False`):
            Every image is already a `{"bytes": ..., "path": ...}` dict. Skips `datasets`' per-row Python encoding,
            which otherwise costs more than generating a 32 px shapes sample (and encodes each image twice).

    Returns:
        `datasets.Dataset`: The rows with the exact `FEATURES` schema, even when `rows` is empty.
    """
    columns = rows if isinstance(rows, dict) else {name: [row[name] for row in rows] for name in FEATURES}
    if encoded:
        table = InMemoryTable.from_pydict(columns, schema=FEATURES.arrow_schema)
        return datasets.Dataset(table, info=datasets.DatasetInfo(features=FEATURES))
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def encode_png(image: "PILImage.Image | np.ndarray", compress_level: int = 1) -> dict[str, Any]:
    """
    Encode an RGB image as PNG bytes in the `{"bytes", "path"}` form the `Image` feature stores.

    A direct zlib + chunk writer: PIL's `save` costs ~100 us of Python overhead per call even for a 32 px image,
    more than drawing it.

    Args:
        image (`PIL.Image.Image` or `np.ndarray`):
            RGB image, or a `[H, W, 3]` `uint8` array.
        compress_level (`int`, defaults to `1`):
            zlib level (0 stores uncompressed, which is fastest but ~1.5x larger for noisy images).

    Returns:
        `dict[str, Any]`: `{"bytes": <png bytes>, "path": None}`.
    """
    pixels = np.asarray(to_rgb_image(image) if isinstance(image, PILImage.Image) else image, dtype=np.uint8)
    height, width, _ = pixels.shape
    raw = np.zeros((height, 1 + width * 3), dtype=np.uint8)  # a leading 0 per row = PNG filter type "None"
    raw[:, 1:] = pixels.reshape(height, -1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level))
    return {"bytes": png + chunk(b"IEND", b""), "path": None}


class RowCollector:
    """
    Collect rows whose images must exist, skipping (and counting) the ones that do not.

    Args:
        source (`str`):
            Name used in the warning.
        limit (`int`, *optional*):
            Stop accepting rows once this many were kept; `full` tells the caller to stop iterating.
        check_images (`bool`, defaults to `True`):
            Open each image header with PIL (catches non-image / corrupt headers). With `False` only existence is
            checked, which is faster on slow network file systems.
    """

    def __init__(self, source: str, limit: int | None = None, check_images: bool = True):
        if limit is not None and limit < 0:
            raise ValueError(f"`limit` must be >= 0 or None, got {limit}.")
        self.source, self.limit, self.check_images = source, limit, check_images
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self._seen: dict[str, bool] = {}  # VQA sets reuse each image for ~5 questions: check each file once

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.rows) >= self.limit

    def _ok(self, path: str) -> bool:
        if path not in self._seen:
            self._seen[path] = is_readable_image(path) if self.check_images else os.path.isfile(path)
        return self._seen[path]

    def add(self, image_paths: list[str], row: dict[str, Any]) -> None:
        """Add `row` unless one of `image_paths` is missing/unreadable (then count it as skipped)."""
        if self.full:
            return
        bad = [p for p in image_paths if not self._ok(p)]
        if bad:
            self.skipped.append(bad[0])
            return
        self.rows.append(row)

    def skip(self, reason: str) -> None:
        """Count a row skipped for a reason other than its image (e.g. no reference answers)."""
        self.skipped.append(reason)

    def to_dataset(self) -> datasets.Dataset:
        if self.skipped:
            logger.warning(
                "%s: skipped %d row(s) with a missing/unreadable image or no answer (first: %s).",
                self.source,
                len(self.skipped),
                self.skipped[0],
            )
        for row in self.rows:  # pre-encoded paths take the fast Arrow path (VQAv2 train has 443k rows)
            row["images"] = [{"bytes": None, "path": p} for p in row["images"]]
        return rows_to_dataset(self.rows, encoded=True)


def load_table(path_or_hub_id: str, split: str = "train", name: str | None = None) -> datasets.Dataset:
    """
    Load a tabular file (`.parquet`, `.jsonl`, `.json`, `.csv`) or a Hub dataset with `datasets.load_dataset`.

    Args:
        path_or_hub_id (`str`):
            A local file, a local directory of parquet/json files, or a Hub dataset id.
        split (`str`, defaults to `"train"`):
            Split to load. Local single files always hold one split, so it is ignored for them.
        name (`str`, *optional*):
            Hub configuration name (e.g. `"all"` for SmolTalk).

    Returns:
        `datasets.Dataset`: The raw table, columns untouched.
    """
    builders = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
    ext = os.path.splitext(path_or_hub_id)[1].lower()
    if os.path.isfile(path_or_hub_id):
        if ext not in builders:
            raise ValueError(f"Unsupported file type {ext!r} for {path_or_hub_id!r}; expected one of {list(builders)}.")
        return datasets.load_dataset(builders[ext], data_files=path_or_hub_id, split="train")
    return datasets.load_dataset(path_or_hub_id, name, split=split)


def _table_image(value: Any, image_root: str | None) -> Any:
    """An image cell of a Hub/parquet/jsonl table, with relative paths (str or `{"path"}`) made absolute."""
    if isinstance(value, str):
        return resolve_image_path(value, [image_root or "."])
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        return {"bytes": None, "path": resolve_image_path(value["path"], [image_root or "."])}
    return value


def convert_table(
    table: datasets.Dataset,
    to_row: Callable[[dict[str, Any]], dict[str, Any] | None],
    source: str,
    image_column: str | None = None,
    image_root: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """
    Convert a raw table into the GhostVis schema row by row, dropping rows `to_row` rejects or whose image is missing.

    Args:
        table (`datasets.Dataset`):
            Raw table from `load_table`.
        to_row (`Callable`):
            Maps a raw record (relative image paths already made absolute) to a row, or `None` to drop it.
        source (`str`):
            Name used in the warning about skipped rows.
        image_column (`str`, *optional*):
            Column that holds the image. If it holds path strings, rows with missing files are skipped.
        image_root (`str`, *optional*):
            Directory relative image paths are resolved against.
        limit (`int`, *optional*):
            Keep at most this many rows.

    Returns:
        `datasets.Dataset`: Converted rows with the `FEATURES` schema.
    """
    n_missing = 0
    if image_column is not None and table.features[image_column] == Value("string"):
        n_total = len(table)
        table = table.filter(
            lambda v: is_readable_image(resolve_image_path(v, [image_root or "."])), input_columns=image_column
        )
        n_missing = n_total - len(table)
    if limit is not None:
        # NOTE: applied after the image filter so `limit` counts usable rows; before `map` so we don't convert the rest.
        table = table.select(range(min(limit, len(table))))

    def convert(batch: dict[str, list]) -> dict[str, list]:
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        rows = []
        for record in records:
            if image_column is not None:
                value = record[image_column]
                record[image_column] = (
                    [_table_image(v, image_root) for v in value]
                    if isinstance(value, list)
                    else _table_image(value, image_root)
                )
            row = to_row(record)
            if row is not None:
                rows.append(row)
        return {name: [row[name] for row in rows] for name in FEATURES}

    # The image column is read undecoded: re-encoding Hub images through PIL would only cost time.
    feature = table.features[image_column] if image_column is not None else None
    if isinstance(feature, Image):
        table = table.cast_column(image_column, Image(decode=False))
    elif isinstance(feature, List) and isinstance(feature.feature, Image):
        table = table.cast_column(image_column, List(Image(decode=False)))
    out = table.map(convert, batched=True, batch_size=256, remove_columns=table.column_names, features=FEATURES)
    n_skipped = n_missing + len(table) - len(out)
    if n_skipped:
        logger.warning("%s: skipped %d row(s) with a missing/unreadable image or no answer.", source, n_skipped)
    return out
