"""Reading a data source into the shared schema (`common.FEATURES`): local annotation layouts, files and Hub tables.

Local layouts (`collect_rows`): split aliases (`validation` -> `val`), annotation JSON read with an error that names
the expected file, image file names resolved against a few candidate folders. Tables (`load_table`, `convert_table`):
a `.parquet`/`.jsonl`/`.json`/`.csv` file, a folder of them, or a Hub dataset id, converted row by row with the image
column left undecoded.

Missing or unreadable images: rows whose image file does not exist, or whose header PIL cannot parse, are dropped,
as are rows with no answer; one warning per load counts them per reason, and inside `validate.recording_bad_rows` (the
training path) each also goes to that record: refused under `--bad_rows error`, counted in the training summary under
`skip`. A file cut short behind a readable header passes here; `validate.validate_rows` decodes it in full.
"""

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import datasets
from datasets import Image, List, Value
from PIL import Image as PILImage

from ..arg_types import written_as_path
from .common import FEATURES, rows_to_dataset
from .validate import loader_record


logger = logging.getLogger(__name__)

SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


def is_readable_image(path: str) -> bool:
    """Cheap check that `path` exists and PIL recognises its header (pixel data is not decoded)."""
    return image_file_problem(path) is None


def image_file_problem(path: str, check_images: bool = True) -> tuple[str, str] | None:
    """`(reason, detail)` when `path` does not exist or (with `check_images`) PIL does not recognise its header, else
    None. Cheap: the pixel data is not decoded."""
    if not os.path.isfile(path):
        return "missing_image", f"no such image file {path!r}"
    if check_images:
        try:
            with PILImage.open(path):
                pass
        except (OSError, SyntaxError, ValueError) as e:
            return "unreadable_image", f"{path!r} is not a readable image ({e})"
    return None


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
    Collect rows whose images must exist, dropping (and counting, per reason) the ones that do not.

    Args:
        source (`str`):
            Name used in the warning and in the row names (`"3 of vqav2"`).
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
        self.bad = loader_record()
        self._seen: dict[str, tuple | None] = {}  # VQA sets reuse each image for ~5 questions: check each file once

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.rows) >= self.limit

    def add(self, index: int, image_paths: list[str], row: dict[str, Any]) -> None:
        """Add `row` (record `index` of the source) unless one of `image_paths` is missing/unreadable."""
        if self.full:
            return
        for path in image_paths:
            if path not in self._seen:
                self._seen[path] = image_file_problem(path, self.check_images)
            if self._seen[path] is not None:
                self.bad.add(f"{index} of {self.source}", *self._seen[path])
                return
        self.rows.append(row)

    def skip(self, index: int, detail: str) -> None:
        """Drop record `index` for having no answer (`detail` says which)."""
        self.bad.add(f"{index} of {self.source}", "no_answer", detail)

    def to_dataset(self) -> datasets.Dataset:
        self.bad.log(self.source, to=logger)
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
    for index, record in enumerate(records):
        if collector.full:
            break
        path = resolve_image_path(image_file(record), search_dirs)
        row = to_row(record, path)
        if row is None:
            collector.skip(index, skip_reason(record))
        else:
            collector.add(index, [path], row)
    return collector.to_dataset()


DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # `datasets` builders


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
    ext = os.path.splitext(path_or_hub_id)[1].lower()
    if os.path.isfile(path_or_hub_id):
        if ext not in DATA_FILE_BUILDERS:
            raise ValueError(f"Unsupported file type {ext!r} for {path_or_hub_id!r}; expected one of "
                             f"{list(DATA_FILE_BUILDERS)}.")
        # `datasets` fails on a file without rows with errors that do not say so: StopIteration (blank), "Instruction
        # 'train' corresponds to no data" (a csv header, an empty JSON list)
        empty = ValueError(f"{path_or_hub_id!r} has no rows")
        if _blank(path_or_hub_id):
            raise empty
        try:
            table = datasets.load_dataset(DATA_FILE_BUILDERS[ext], data_files=path_or_hub_id, split="train")
        except ValueError as e:
            if "corresponds to no data" in str(e):
                raise empty from None
            raise
        if len(table) == 0:
            raise empty
        return table
    if not os.path.isdir(path_or_hub_id) and not is_hub_id(path_or_hub_id):
        raise FileNotFoundError(f"No such data file or folder: {path_or_hub_id!r}")
    return datasets.load_dataset(path_or_hub_id, name, split=split)


def is_hub_id(path_or_hub_id: str) -> bool:
    """Whether a data argument that is no local file or folder can be a Hub dataset id (`name`, `owner/name`): not
    when it is written as a path (`./`, `/`, `~`, more than one `/`) or names a data file (`.jsonl`, ...)."""
    return not (written_as_path(path_or_hub_id) or os.path.splitext(path_or_hub_id)[1].lower() in DATA_FILE_BUILDERS)


def _blank(path: str, limit: int = 1 << 16) -> bool:
    """Whether a (small) file holds nothing but whitespace, or an empty JSON list."""
    if os.path.getsize(path) > limit:
        return False
    with open(path, "rb") as f:
        return f.read().strip() in (b"", b"[]")


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


def _rows_with_images(table: datasets.Dataset, image_column: str, image_root: str | None, limit: int | None, bad,
                      source: str) -> list[int]:
    """Indices of the rows of `table` whose image path (a string column) exists and opens, up to `limit` of them;
    each other row goes to `bad` with its reason."""
    keep, seen = [], {}
    for index, value in enumerate(table[image_column]):
        if limit is not None and len(keep) >= limit:
            break
        path = resolve_image_path(value, [image_root or "."]) if value else ""
        if path not in seen:
            seen[path] = image_file_problem(path) if path else ("missing_image", "no image path")
        if seen[path] is None:
            keep.append(index)
        else:
            bad.add(f"{index} of {source}", *seen[path])
    return keep


def convert_table(
    table: datasets.Dataset,
    to_row: Callable[[dict[str, Any]], dict[str, Any] | None],
    source: str,
    image_column: str | None = None,
    image_root: str | None = None,
    limit: int | None = None,
    reject_reason: str = "no_answer",
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
        reject_reason (`str`, defaults to `"no_answer"`):
            The reason counted for the rows `to_row` rejects.

    Returns:
        `datasets.Dataset`: Converted rows with the `FEATURES` schema.
    """
    bad = loader_record()
    index = range(len(table))  # position in the converted table -> row of the source table
    if image_column is not None and table.features[image_column] == Value("string"):
        index = _rows_with_images(table, image_column, image_root, limit, bad, source)
        table = table.select(index)
    if limit is not None:
        # NOTE: applied after the image check so `limit` counts usable rows; before `map` so we don't convert the rest.
        table, index = table.select(range(min(limit, len(table)))), index[:limit]

    def prepare(record: dict[str, Any]) -> dict[str, Any]:
        if image_column is not None:
            value = record[image_column]
            record[image_column] = (
                [_table_image(v, image_root) for v in value]
                if isinstance(value, list)
                else _table_image(value, image_root)
            )
        return record

    def convert(batch: dict[str, list]) -> dict[str, list]:
        rows = [to_row(prepare(dict(zip(batch, values)))) for values in zip(*batch.values())]
        return {name: [row[name] for row in rows if row is not None] for name in FEATURES}

    # The image column is read undecoded: re-encoding Hub images through PIL would only cost time.
    feature = table.features[image_column] if image_column is not None else None
    if isinstance(feature, Image):
        table = table.cast_column(image_column, Image(decode=False))
    elif isinstance(feature, List) and isinstance(feature.feature, Image):
        table = table.cast_column(image_column, List(Image(decode=False)))
    out = table.map(convert, batched=True, batch_size=256, remove_columns=table.column_names, features=FEATURES)
    if len(out) < len(table):
        # NOTE: counted from the lengths, not inside `convert`: `map` may answer from its cache without calling it.
        first = next((pos for pos, record in enumerate(table) if to_row(prepare(record)) is None), 0)
        n = len(table) - len(out)
        bad.add(f"{index[first]} of {source}", reject_reason, f"the {source} loader rejected it ({n} such row(s))", n)
    bad.log(source, to=logger)
    return out
