"""Your own data: TRL's conversational format, from a file, a folder, a `save_to_disk` folder or a Hub id.

Rows, in the formats of TRL's `sft_vlm` examples:
- `messages`: `{"role", "content"}` turns whose `content` is a string or a list of `{"type": "image"}` /
  `{"type": "text", "text": ...}` parts, with `images` (a list of paths, `{"bytes", "path"}` dicts or an `Image`
  feature) or one `image` (what an imagefolder's `file_name` becomes). No images: a text-only row, which trains too.
- `prompt` + `completion`: TRL's prompt-completion format, conversational (lists of turns) or standard (strings); the
  row is `prompt + completion`.
As in TRL's `prepare_multimodal_messages`, a row without any `{"type": "image"}` part gets its images in front of the
first user turn given as a plain string; otherwise its image parts must match its images one to one. LLaVA-style rows,
whose plain-string user turns mark each image with `<image>`, get an image part at each marker instead (the marker
and the newline after it leave the text), and the markers must match the images one to one. The last turn
must be the assistant's: it is the training target and, for evaluation, the single reference answer (`answers`).

Sources (`read_conversations`): a `.jsonl`/`.json`/`.parquet`/`.csv` file, a `save_to_disk` folder, an imagefolder
(images + a `metadata.jsonl`/`.csv` whose `file_name` or `file_names` column names them), a folder of data files
(`train.jsonl`, `test.jsonl`: one split each), or a Hub id. Relative image paths resolve against the data file's
folder (the folder itself for folders, the working directory for a Hub id), or against `image_root` when given.
Columns stored as JSON text (`messages` in a CSV) are parsed.

Bad rows (unusable turns, no final answer, image count mismatch, a missing or unreadable image file) are dropped and
counted per reason in one warning; inside `validate.recording_bad_rows` (training) they go to its record, so
`--bad_rows error` refuses the first of them by its row number.

NOTE: those checks are a plain Python pass on every load, never a cached `filter`/`map`: `datasets` keys its cache on
the data file's fingerprint, so a cached filter kept serving the rows it had dropped for a missing image after the
user fixed the image folder (issue 15). Only the pure conversion of the kept rows (`select` + `map`) is cached.
"""

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import datasets
from datasets import Image, List

from .common import FEATURES, apply_answer_style, image_part, text_part
from .loading import DATA_FILE_BUILDERS, SPLIT_ALIASES, image_file_problem, is_hub_id, load_table
from .validate import loader_record


logger = logging.getLogger(__name__)

SOURCE = "conversations"
ROLES = ("system", "user", "assistant")
IMAGE_MARKER = "<image>"  # LLaVA-style data: where an image goes in a plain-string turn
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what `save_to_disk` writes
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


class BadRow(ValueError):
    """Why a row cannot be used: `reason` (the count key of `validate.BadRows`) and the detail in the message."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def load_conversations(
    path_or_hub_id: str,
    split: str = "train",
    image_root: str | None = None,
    limit: int | None = None,
    *,
    name: str | None = None,
    answer_style: str = "none",
) -> datasets.Dataset:
    """
    Load conversational data (TRL's `messages` + `images`, or `prompt` + `completion`) in the GhostVis schema.

    Args:
        path_or_hub_id (`str`):
            A `.jsonl`/`.json`/`.parquet`/`.csv` file, a `save_to_disk` folder, an imagefolder with a metadata file, a
            folder of data files, or a Hub dataset id.
        split (`str`, defaults to `"train"`):
            Split of a folder or Hub dataset (`"validation"`, `"val"` and `"dev"` are one); a single file is one
            split, and a source with a single split serves it whatever the name.
        image_root (`str`, *optional*):
            Folder that relative image paths resolve against, instead of the data file's folder.
        limit (`int`, *optional*):
            Keep at most this many (usable) rows, the first ones.
        name (`str`, *optional*):
            Hub configuration name.
        answer_style (`str`, defaults to `"none"`):
            `"none"` keeps the questions as written; `"short"` appends "Answer the question using a single word or
            phrase." to every user turn (as the VQA adapters do by default).

    Returns:
        `datasets.Dataset`: Rows with the `FEATURES` schema: `answers` = [text of the final assistant turn],
        `question_type` the row's own `question_type` column if any, else `"conversation"` (`"text"` without
        images), `source="conversations"`.

    Example:
    ```python
    >>> import json
    >>> from PIL import Image
    >>> from ghostvis_hf.data import load_conversations
    >>> Image.new("RGB", (32, 32), "red").save("red.png")
    >>> rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
    ...                       {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
    ...          "images": ["red.png"]},
    ...         {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}]
    >>> with open("train.jsonl", "w") as f:
    ...     f.writelines(json.dumps(row) + "\\n" for row in rows)
    >>> ds = load_conversations("train.jsonl")
    >>> list(ds["answers"]), list(ds["question_type"]), [len(images) for images in ds["images"]]
    ([['red'], ['hi']], ['conversation', 'text'], [1, 0])
    ```
    """
    if limit is not None and limit < 0:
        raise ValueError(f"`limit` must be >= 0 or None, got {limit}.")
    apply_answer_style("", answer_style)  # refuses an unknown style before anything is read
    table, base_dir, in_memory = read_conversations(path_or_hub_id, split, name)
    root = os.path.abspath(image_root) if image_root is not None else base_dir
    column = next((c for c in ("images", "image") if c in table.column_names), None)
    table = _undecoded(table, column, in_memory)
    kept = _usable_rows(table, column, root, answer_style, limit, where=path_or_hub_id)

    def convert(batch: dict[str, list]) -> dict[str, list]:
        rows = [conversation_row(dict(zip(batch, values)), column, root, answer_style)
                for values in zip(*batch.values())]
        return {key: [row[key] for row in rows] for key in FEATURES}

    # A `save_to_disk` folder is converted in memory: `datasets` would write its cache files into the user's folder.
    table = table.select(kept, keep_in_memory=in_memory)
    return table.map(convert, batched=True, batch_size=256, remove_columns=table.column_names, features=FEATURES,
                     keep_in_memory=in_memory, desc=f"conversations {os.path.basename(path_or_hub_id)}")


def read_conversations(path_or_hub_id: str, split: str = "train", name: str | None = None):
    """
    The raw table of a conversational source, undecoded and unchecked.

    Returns:
        `tuple`: `(datasets.Dataset, base_dir, in_memory)`: the table, the folder relative image paths resolve
        against, and whether it is a `save_to_disk` folder (whose conversion is kept in memory).
    """
    path = os.path.expanduser(path_or_hub_id)
    if os.path.isfile(path):
        if os.path.splitext(path)[1].lower() not in DATA_FILE_BUILDERS:
            raise ValueError(f"Unsupported file type for {path!r}; expected one of {list(DATA_FILE_BUILDERS)}, a "
                             "folder (save_to_disk, imagefolder with metadata.jsonl, data files) or a Hub id.")
        return load_table(path), os.path.dirname(os.path.abspath(path)), False
    if os.path.isdir(path):
        root = os.path.abspath(path)
        if any(os.path.isfile(os.path.join(path, f)) for f in SAVED_DATASET_FILES):
            return _pick_split(datasets.load_from_disk(path), split, path), root, True
        if any(f in METADATA_FILES for _, _, files in os.walk(path) for f in files):
            return _pick_split(datasets.load_dataset("imagefolder", data_dir=path), split, path), root, False
        return _pick_split(datasets.load_dataset(_folder_builder(path), data_dir=path), split, path), root, False
    if not is_hub_id(path_or_hub_id):
        raise FileNotFoundError(f"No such data file or folder: {path_or_hub_id!r}")
    return datasets.load_dataset(path_or_hub_id, name, split=split), os.getcwd(), False


def _folder_builder(path: str) -> str:
    """The `datasets` builder of a folder of data files (all of one kind)."""
    kinds = {DATA_FILE_BUILDERS[ext] for _, _, files in os.walk(path) for f in files
             if (ext := os.path.splitext(f)[1].lower()) in DATA_FILE_BUILDERS}
    if len(kinds) != 1:
        raise ValueError(f"{path!r} holds {'no' if not kinds else 'several kinds of'} data files "
                         f"({sorted(kinds)}); expected .jsonl/.json, .parquet or .csv files of one kind, a "
                         f"save_to_disk folder, or images with a metadata.jsonl/metadata.csv.")
    return kinds.pop()


def _pick_split(loaded, split: str, where: str) -> datasets.Dataset:
    """`split` of a `DatasetDict` (aliases accepted; a single split is served whatever its name)."""
    if isinstance(loaded, datasets.Dataset):
        return loaded
    wanted = SPLIT_ALIASES.get(split, split)
    for key in loaded:
        if SPLIT_ALIASES.get(key, key) == wanted:
            return loaded[key]
    if len(loaded) == 1:
        only = next(iter(loaded))
        logger.info("%s: no split %r, using its only split %r", where, split, only)
        return loaded[only]
    raise ValueError(f"{where!r} has splits {list(loaded)}, not {split!r}.")


def _undecoded(table: datasets.Dataset, column: str | None, in_memory: bool) -> datasets.Dataset:
    """The table with its `Image` column left as `{"bytes", "path"}` (checked and passed on, never decoded here)."""
    feature = table.features[column] if column is not None else None
    if isinstance(feature, Image):
        feature = Image(decode=False)
    elif isinstance(feature, List) and isinstance(feature.feature, Image):
        feature = List(Image(decode=False))
    else:
        return table
    return table.cast(datasets.Features({**table.features, column: feature}), keep_in_memory=in_memory)


def _records(table: datasets.Dataset, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    # Python batches: `Json` cells (datasets 5 stores mixed-type content parts as JSON text) are decoded; image cells
    # stay `{"bytes", "path"}` dicts (`_undecoded`).
    for batch in table.iter(batch_size=batch_size):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _usable_rows(table, column, root: str, answer_style: str, limit: int | None, where: str) -> list[int]:
    """Indices of the usable rows (up to `limit`); every other row goes to the loader's record with its reason."""
    bad, kept, checked, seen = loader_record(), [], {}, 0
    for index, record in enumerate(_records(table)):
        if limit is not None and len(kept) >= limit:
            break
        seen += 1
        try:
            row = conversation_row(record, column, root, answer_style)
            for k, image in enumerate(row["images"]):
                path = image if isinstance(image, str) else image.get("path") if image.get("bytes") is None else None
                if path is None:
                    continue  # embedded bytes: `validate_rows` decodes them in full before training
                if path not in checked:
                    checked[path] = image_file_problem(path)
                if checked[path] is not None:
                    raise BadRow(checked[path][0], f"image {k}: {checked[path][1]}")
        except BadRow as e:
            bad.add(f"{index} of {where}", e.reason, str(e))
            continue
        kept.append(index)
    bad.log(f"{SOURCE} {where}", of=seen, to=logger)
    return kept


def conversation_row(record: dict[str, Any], image_column: str | None, root: str, answer_style: str = "none"):
    """
    One raw record as a row of the `FEATURES` schema, images as absolute paths or `{"bytes", "path"}` dicts.

    Raises:
        `BadRow`: when the record cannot be used (its `reason` is the count key).
    """
    turns = _turns(record)
    images = _images(record.get(image_column) if image_column else None, root)
    messages, n_markers = [], 0
    needs_images = images and not any(isinstance(t.get("content"), list) and any(
        isinstance(p, dict) and p.get("type") == "image" for p in t["content"]) for t in turns)
    # LLaVA-style rows mark where each image goes with "<image>" in plain-string user turns
    llava_markers = needs_images and any(t.get("role") == "user" and isinstance(t.get("content"), str)
                                         and IMAGE_MARKER in t["content"] for t in turns)
    for turn in turns:
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise BadRow("unusable_messages", f"role {role!r} is not one of {list(ROLES)}")
        parts = _parts(content)
        if llava_markers and role == "user" and isinstance(content, str):
            parts, needs_images = _split_at_markers(content), False
        elif needs_images and role == "user" and isinstance(content, str):
            parts, needs_images = [image_part() for _ in images] + parts, False  # TRL's prepare_multimodal_messages
        if role == "user" and answer_style != "none":
            last_text = next((p for p in reversed(parts) if p["type"] == "text"), None)
            if last_text is not None:
                last_text["text"] = apply_answer_style(last_text["text"], answer_style)
        n_markers += sum(p["type"] == "image" for p in parts)
        messages.append({"role": role, "content": parts})
    if n_markers != len(images):
        raise BadRow("image_count_mismatch", f"{n_markers} <image> markers but {len(images)} images")
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRow("no_answer", "the last turn is not the assistant's (the target and reference answer)")
    answer = " ".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text").strip()
    if not answer:
        raise BadRow("no_answer", "the final assistant turn has no text")
    question_type = record.get("question_type")
    if not isinstance(question_type, str) or not question_type:
        question_type = "conversation" if images else "text"
    return {"images": images, "messages": messages, "answers": [answer], "question_type": question_type,
            "source": SOURCE}


def _json_value(value: Any, what: str) -> Any:
    """A column cell that may be JSON text (CSV metadata), parsed when it looks like a JSON list."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow("unusable_messages", f"{what} is not valid JSON ({e})") from None
    return value


def _turns(record: dict[str, Any]) -> list[dict]:
    """The conversation of a `messages` row, or `prompt + completion` (each a list of turns or a plain string)."""
    if record.get("messages") is not None:
        turns = _json_value(record["messages"], "messages")
        if not isinstance(turns, list):
            raise BadRow("unusable_messages", "messages is not a list of {role, content} turns")
        return turns
    if "prompt" in record and "completion" in record:
        prompt = _json_value(record["prompt"], "prompt")
        completion = _json_value(record["completion"], "completion")
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return prompt + list(completion or [])
    raise BadRow("unusable_messages", "no messages (nor prompt + completion)")


def _split_at_markers(text: str) -> list[dict[str, Any]]:
    """A plain-string turn with `<image>` markers as parts: an image part at each marker (the newline LLaVA data put
    after it dropped), the text around them as text parts."""
    parts = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            parts.append(image_part())
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append(text_part(piece))
    return parts


def _parts(content: Any) -> list[dict[str, Any]]:
    """A turn's content as `{"type", "text"}` parts (new dicts: the record is left as it was)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [text_part(content)]
    parts = []
    for part in content:
        kind = "text" if isinstance(part, str) else part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(text_part(part if isinstance(part, str) else part.get("text") or ""))
        elif kind == "image":
            parts.append(image_part())
        else:
            raise BadRow("unusable_messages", f"content part of type {kind!r}; expected 'text' or 'image'")
    return parts


def _images(value: Any, root: str) -> list:
    """A row's images as a list: relative paths (strings or `{"path"}` without bytes) made absolute against `root`."""
    value = _json_value(value, "images")
    if value is None:
        return []
    images = []
    for image in value if isinstance(value, list) else [value]:
        if isinstance(image, str):
            images.append(os.path.join(root, os.path.expanduser(image)))
        elif isinstance(image, dict) and (image.get("bytes") is not None or image.get("path")):
            if image.get("bytes") is None:
                image = {"bytes": None, "path": os.path.join(root, os.path.expanduser(image["path"]))}
            images.append(image)
        else:
            raise BadRow("missing_image", f"an image entry is empty ({image!r})")
    return images
