"""Shared pieces of every GhostVis data source: the Arrow schema, row building and PNG encoding.

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

Reading the sources themselves (local layouts, tables, skipping missing images) is `loading.py`'s job.
"""

import struct
import zlib
from collections import Counter
from typing import Any

import datasets
import numpy as np
from datasets import Features, Image, List, Value
from datasets.table import InMemoryTable
from PIL import Image as PILImage

from ..processing_ghostvis import to_rgb_image  # the one RGB conversion; the processor file must stay self-contained


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
# What an adapter does to each question: "short" appends `SHORT_ANSWER_PROMPT` (LLaVA's VQA prompt, the default of the
# VQA-style adapters), "none" keeps the question as written (the default for conversational data).
ANSWER_STYLES = ("short", "none")


def apply_answer_style(question: str, answer_style: str) -> str:
    """
    The question as the model sees it under `answer_style`.

    Example:
    ```python
    >>> from ghostvis_hf.data.common import apply_answer_style
    >>> apply_answer_style("What colour is the circle?", "short")
    'What colour is the circle?\\nAnswer the question using a single word or phrase.'
    >>> apply_answer_style("What colour is the circle?", "none")
    'What colour is the circle?'
    ```
    """
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"answer_style={answer_style!r} is not supported; allowed: {list(ANSWER_STYLES)}")
    return f"{question}\n{SHORT_ANSWER_PROMPT}" if answer_style == "short" else question


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


def short_answer_row(
    image: Any, question: str, target: str, answers: list[str], question_type: str, source: str,
    answer_style: str = "short",
) -> dict[str, Any]:
    """`build_vqa_row` for one image; under `answer_style="short"` the prompt is `question` + `SHORT_ANSWER_PROMPT`
    (LLaVA's short-answer VQA), under `"none"` the question as written."""
    return build_vqa_row([image], apply_answer_style(question, answer_style), target, answers, question_type, source)


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
