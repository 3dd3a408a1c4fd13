"""Text-only chat data (SmolTalk-style), mixed into vision training so the language model keeps its chat skills.

Input: a `.jsonl`/`.json`/`.parquet` file, a local folder of them, or a Hub id, with a `messages` column of
`{"role", "content"}` turns where `content` is a string (or already a list of text parts). Output rows have
`images=[]`, every `content` as a list of `{"type": "text", "text": ...}` parts (same Arrow schema as the vision
sets, so `mix_datasets` can concatenate them), `answers=[last assistant reply]`, `question_type="text"`.

Rows with no messages, or with images (image parts or an `images` column), are skipped with one warning: the
`conversations` source (`conversations.py`) takes rows with and without images.
"""

import logging

import datasets

from .common import text_part
from .loading import convert_table, load_table


SOURCE = "text_chat"
logger = logging.getLogger(__name__)


def _content_parts(content) -> list[dict] | None:
    """Content as text parts; None when it holds an image part (unusable in a text-only row)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [text_part(content)]
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(text_part(part))
        elif part.get("type") == "text":
            parts.append(text_part(part.get("text") or ""))
        else:
            return None
    return parts


def load_text_chat(
    path_or_hub_id: str,
    split: str = "train",
    image_root: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    messages_column: str = "messages",
) -> datasets.Dataset:
    """
    Load a text-only chat dataset in the GhostVis conversational format.

    Args:
        path_or_hub_id (`str`):
            A `.jsonl`/`.json`/`.parquet` file, a local folder of them, or a Hub dataset id (e.g.
            `HuggingFaceTB/smoltalk` with `name="all"`).
        split (`str`, defaults to `"train"`):
            Hub split (ignored for a single local file).
        image_root (`str`, *optional*):
            Unused; accepted so every loader has the same signature.
        limit (`int`, *optional*):
            Keep at most this many rows.
        name (`str`, *optional*):
            Hub configuration name.
        messages_column (`str`, defaults to `"messages"`):
            Column holding the conversation.

    Returns:
        `datasets.Dataset`: Rows with `images=[]`, `answers=[last assistant reply]` (or `[]`),
        `question_type="text"`, `source="text_chat"`.
    """
    del image_root
    table = load_table(path_or_hub_id, split, name)
    if messages_column not in table.column_names:
        raise ValueError(f"{path_or_hub_id!r} has no {messages_column!r} column (has {table.column_names}).")

    if "images" in table.column_names or "image" in table.column_names:
        logger.warning("text_chat is text-only and drops the rows of %r that have images; the conversations source "
                       "(--dataset_name PATH, or conversations:PATH:WEIGHT in a mixture) trains both", path_or_hub_id)

    def to_row(record):
        if record.get("images") or record.get("image"):
            return None
        messages = []
        for message in record[messages_column] or []:
            parts = _content_parts(message.get("content"))
            if parts is None:
                return None
            messages.append({"role": message["role"], "content": parts})
        if not messages:
            return None
        replies = [m for m in messages if m["role"] == "assistant"]
        answers = [" ".join(p["text"] for p in replies[-1]["content"])] if replies else []
        return {"images": [], "messages": messages, "answers": answers, "question_type": "text", "source": SOURCE}

    return convert_table(table, to_row, SOURCE, limit=limit, reject_reason="unusable_messages")
