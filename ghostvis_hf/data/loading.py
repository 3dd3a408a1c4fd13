"""Reading a data source into the shared schema (`common.FEATURES`): local annotation layouts, files and Hub tables.

Local layouts (`collect_rows`): split aliases (`validation` -> `val`), annotation JSON read with an error that names
the expected file, image file names resolved against a few candidate folders. Tables (`load_table`, `convert_table`):
a `.parquet`/`.jsonl`/`.json`/`.csv` file, a folder of them, or a Hub dataset id, converted row by row with the image
column left undecoded.

Missing or unreadable images: rows whose image file does not exist, or whose header PIL cannot parse, are
skipped, and one warning with the number skipped is logged per load (see `RowCollector`).
"""

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import datasets
from datasets import Image, List, Value
from PIL import Image as PILImage

from .common import FEATURES, rows_to_dataset


logger = logging.getLogger(__name__)

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


def collect_rows(
    records: Iterable[Any],
    image_file: Callable[[Any], str],
    search_dirs: list[str],
    to_row: Callable[[Any, str], dict[str, Any] | None],
    skip_reason: Callable[[Any], str],
    source: str,
    limit: int | None = None,
    check_images: bool = True,
) -> datasets.Dataset:
    """
    Convert the records of a source's local annotation files (one image each) into a dataset, in file order.

    Args:
        records (`Iterable`):
            The annotation records.
        image_file (`Callable`):
            The image file name of a record, resolved against `search_dirs` (`resolve_image_path`).
        search_dirs (`list[str]`):
            Where the images are (`image_search_dirs`).
        to_row (`Callable`):
            Maps a record and its image path to a row, or `None` to skip it (e.g. it has no reference answer).
        skip_reason (`Callable`):
            Why `to_row` skipped a record, for the warning.
        source, limit, check_images:
            As for `RowCollector`; rows whose image is missing or unreadable are skipped too.

    Returns:
        `datasets.Dataset`: The rows with the `FEATURES` schema.
    """
    collector = RowCollector(source, limit=limit, check_images=check_images)
    for record in records:
        if collector.full:
            break
        path = resolve_image_path(image_file(record), search_dirs)
        row = to_row(record, path)
        if row is None:
            collector.skip(skip_reason(record))
        else:
            collector.add([path], row)
    return collector.to_dataset()


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


def load_image_table(
    path_or_hub_id: str,
    split: str,
    name: str | None,
    columns: Iterable[str],
    to_row: Callable[[dict[str, Any], Any], dict[str, Any] | None],
    source: str,
    image_root: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """
    Load a table with `load_table`, check it has `columns`, and convert it with `convert_table` (image column
    `"image"`): what every VQA-style source does with anything that is not its local folder layout.

    Args:
        path_or_hub_id, split, name:
            As for `load_table`.
        columns (`Iterable[str]`):
            Columns `to_row` reads; a table without one of them is refused with a `ValueError` naming it.
        to_row (`Callable`):
            Maps a raw record and its image (the `"image"` cell) to a row, or `None` to drop it; the same call as for
            `collect_rows`, so one function can serve a source's folder layout and its tables.
        source, image_root, limit:
            As for `convert_table`.

    Returns:
        `datasets.Dataset`: Converted rows with the `FEATURES` schema.
    """
    table = load_table(path_or_hub_id, split, name)
    missing = set(columns) - set(table.column_names)
    if missing:
        raise ValueError(f"{path_or_hub_id!r} lacks columns {sorted(missing)} (has {table.column_names}).")
    return convert_table(
        table, lambda record: to_row(record, record["image"]), source, image_column="image", image_root=image_root,
        limit=limit,
    )


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
