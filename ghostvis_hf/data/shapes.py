"""Procedural "shapes" VQA: coloured circles/squares/triangles on light backgrounds, drawn with PIL.

This is the built-in smoke-test dataset: a tiny model trained from scratch on CPU must reach high held-out accuracy
on it, and it must not be solvable from text alone. So:

- Answers are balanced by construction: the answer is drawn *first* (uniformly), then an image is built around it.
  E.g. for "What color is the circle?" the circle's colour is uniform over the palette whatever the phrasing, so a
  text-only model is stuck at 1/len(colors). `chance_accuracy` measures exactly that prior.
- Every question is unambiguous: colour questions are only asked about a shape that appears exactly once, shape
  questions about a colour that appears exactly once, position questions only about two objects whose
  colour+shape combination is unique and whose horizontal extents do not overlap.
- Shapes never overlap (>= `gap` px apart), are >= ~10 px at 32 px, colours are saturated and far from the
  near-white/grey backgrounds, and the colour jitter (+-12) plus pixel noise (+-8) are small next to the palette
  distances (every two palette colours differ by >= 80 in some channel).
- Everything is drawn from one sequential RNG stream per seed, so `num_samples=100` is a prefix of
  `num_samples=1000`, and train/test use seeds derived from the split name, so they share no (image, question).

This file turns answers into questions and rows; `shapes_drawing.py` lays out and draws the pictures.
"""

import hashlib
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import datasets

from .common import build_vqa_row, encode_png, rows_to_dataset, text_part
from .shapes_drawing import ALL_SHAPES, PALETTE, layout, make_noise_bank, render


DEFAULT_COLORS = ("red", "green", "blue", "yellow")
DEFAULT_SHAPES = ("circle", "square", "triangle")
# Colour and shape questions are the main learning target, so they get most of the mass.
DEFAULT_QUESTION_WEIGHTS = {"color": 0.35, "shape": 0.35, "count": 0.1, "position": 0.1, "caption": 0.1}
DEFAULT_NUM_SAMPLES = {"train": 20_000, "validation": 2_000, "test": 2_000}

QUESTION_TEMPLATES = {
    "color": ("What color is the {shape}?", "What is the color of the {shape}?", "Which color does the {shape} have?"),
    "shape": (
        "What shape is the {color} object?",
        "What is the shape of the {color} object?",
        "Which shape is {color}?",
    ),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes in the image."),
    "position": (
        "Is the {color} {shape} on the left or the right of the {color2} {shape2}?",
        "Is the {color} {shape} to the left or to the right of the {color2} {shape2}?",
    ),
    "caption": ("Describe the image.", "What is in the image?", "Describe this picture."),
}


def _split_seed(seed: int, split: str) -> int:
    # A hash, not seed + offset: seed=1/train must not equal seed=0/test.
    return int.from_bytes(hashlib.sha256(f"ghostvis-shapes/{seed}/{split}".encode()).digest()[:8], "little")


def _caption(objects, boxes) -> str:
    # Left-to-right (then top-to-bottom) so the caption is a deterministic function of the picture.
    order = sorted(range(len(objects)), key=lambda i: (boxes[i][0] + boxes[i][2] / 2, boxes[i][1] + boxes[i][2] / 2))
    parts = [f"a {objects[i][1]} {objects[i][0]}" for i in order]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def _sample(rng: random.Random, qtype: str, cfg: dict[str, Any]):
    """Draw (objects, boxes, question, answer) for one question type; the answer is drawn before the image."""
    shapes, colors = cfg["shapes"], cfg["colors"]
    lo, hi = cfg["min_shapes"], cfg["max_shapes"]
    layout_args = (cfg["image_size"], cfg["min_size"], cfg["max_size"], cfg["gap"])
    template = rng.choice(QUESTION_TEMPLATES[qtype])

    def rand_objects(n):
        return [(rng.choice(shapes), rng.choice(colors)) for _ in range(n)]

    if qtype in ("color", "shape"):
        target = (rng.choice(shapes), rng.choice(colors))
        key = 0 if qtype == "color" else 1  # the attribute named in the question must be unique in the image
        pool = [s for s in shapes if s != target[0]] if key == 0 else [c for c in colors if c != target[1]]
        objects = [target]
        for _ in range(rng.randint(lo, hi) - 1):
            other = rng.choice(pool)
            objects.append((other, rng.choice(colors)) if key == 0 else (rng.choice(shapes), other))
        rng.shuffle(objects)
        boxes = layout(rng, len(objects), *layout_args)
        if qtype == "color":
            return objects, boxes, template.format(shape=target[0]), target[1]
        return objects, boxes, template.format(color=target[1]), target[0]

    if qtype == "count":
        objects = rand_objects(rng.randint(lo, hi))
        boxes = layout(rng, len(objects), *layout_args)
        return objects, boxes, template, str(len(objects))

    if qtype == "caption":
        objects = rand_objects(rng.randint(lo, hi))
        boxes = layout(rng, len(objects), *layout_args)
        return objects, boxes, template, _caption(objects, boxes)

    if qtype == "position":
        want = rng.choice(("left", "right"))
        for _ in range(1000):  # a usable pair turns up within a few layouts; the cap only guards odd configs
            objects = rand_objects(rng.randint(max(2, lo), hi))
            boxes = layout(rng, len(objects), *layout_args)
            counts = Counter(objects)
            pairs = [
                (i, j)  # i is entirely left of j, with a visible gap
                for i in range(len(objects))
                for j in range(len(objects))
                if i != j
                and counts[objects[i]] == 1
                and counts[objects[j]] == 1
                and boxes[i][0] + boxes[i][2] + cfg["gap"] <= boxes[j][0]
            ]
            if pairs:
                break
        else:
            raise RuntimeError("Could not lay out two horizontally separated shapes; use smaller shapes.")
        left, right = rng.choice(pairs)
        subject, reference = (left, right) if want == "left" else (right, left)
        (s1, c1), (s2, c2) = objects[subject], objects[reference]
        return objects, boxes, template.format(color=c1, shape=s1, color2=c2, shape2=s2), want

    raise ValueError(f"Unknown question type {qtype!r}; allowed: {tuple(QUESTION_TEMPLATES)}.")


def _follow_ups(rng: random.Random, objects, first_type: str, first_question: str, types):
    """Every other colour/shape question the image answers unambiguously, shuffled: `(qtype, question, answer)`.

    The objects besides the primary question's target are uniform, so a shape that appears exactly once has a
    uniform colour (and vice versa): each follow-up's answer stays balanced on its own.
    """
    counts = {"color": Counter(s for s, _ in objects), "shape": Counter(c for _, c in objects)}
    asked = set(first_question.rstrip("?").split())
    out = []
    for shape, color in objects:
        for qtype, subject, answer, key in (("color", shape, color, "shape"), ("shape", color, shape, "color")):
            if qtype not in types or counts[qtype][subject] != 1 or (qtype == first_type and subject in asked):
                continue
            out.append((qtype, rng.choice(QUESTION_TEMPLATES[qtype]).format(**{key: subject}), answer))
    rng.shuffle(out)
    return out


def _question_weights(question_types: Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """Question type -> sampling weight (`DEFAULT_QUESTION_WEIGHTS` for a plain sequence); `ValueError` if unusable."""
    weights = dict(question_types) if isinstance(question_types, Mapping) else {
        q: DEFAULT_QUESTION_WEIGHTS.get(q, 0.0) for q in question_types
    }
    bad = [q for q in weights if q not in QUESTION_TEMPLATES]
    if bad or not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(
            f"Invalid question_types {question_types!r}: use a non-empty subset of {tuple(QUESTION_TEMPLATES)} "
            "(or a mapping of them to non-negative weights with a positive sum)."
        )
    return weights


def _checked_config(weights, shapes, colors, min_shapes, max_shapes, image_size, min_size, max_size, gap, max_turns):
    """The settings `_sample` reads, default sizes filled in; `ValueError` unless every question is answerable and
    every layout fits."""
    if any(s not in ALL_SHAPES for s in shapes) or any(c not in PALETTE for c in colors):
        raise ValueError(f"shapes must come from {ALL_SHAPES} and colors from {tuple(PALETTE)}.")
    if len(set(shapes)) < 2 or len(set(colors)) < 2:
        raise ValueError("Need at least 2 distinct shapes and 2 distinct colors for the questions to be balanced.")
    if not 1 <= min_shapes <= max_shapes:
        raise ValueError(f"Need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}.")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}.")
    if weights.get("position", 0) > 0 and max_shapes < 2:
        raise ValueError("Position questions need max_shapes >= 2.")
    min_size = max(9, round(0.31 * image_size)) if min_size is None else min_size
    max_size = max(min_size, round(0.45 * image_size)) if max_size is None else max_size
    k = math.ceil(math.sqrt(max_shapes))
    if min_size > max_size or max_size > image_size - 3 or image_size // k < min_size + gap + 1:
        raise ValueError(
            f"{max_shapes} shapes of min_size={min_size} (max_size={max_size}) do not fit in {image_size}px images."
        )
    return dict(shapes=tuple(shapes), colors=tuple(colors), min_shapes=min_shapes, max_shapes=max_shapes,
                image_size=image_size, min_size=min_size, max_size=max_size, gap=gap)  # fmt: skip


def _make_row(rng: random.Random, qtype: str, cfg: dict[str, Any], noise_bank, max_turns: int, follow_up_types):
    """One row: an image drawn around the question's answer, plus up to `max_turns - 1` follow-up turns."""
    objects, boxes, question, answer = _sample(rng, qtype, cfg)
    pixels = render(rng, noise_bank, objects, boxes, cfg["image_size"])
    # compress_level=0: zlib costs ~4x the drawing on noisy 32 px images, for only a 1.5x smaller PNG.
    row = build_vqa_row([encode_png(pixels, 0)], question, answer, question_type=qtype, source="shapes")
    if max_turns > 1:  # NOTE: only here does the RNG stream differ from single-turn data
        for _, q, a in _follow_ups(rng, objects, qtype, question, follow_up_types)[: max_turns - 1]:
            row["messages"] += [{"role": "user", "content": [text_part(q)]},
                                {"role": "assistant", "content": [text_part(a)]}]
    return row


def make_shapes_dataset(
    num_samples: int = 10_000,
    seed: int = 0,
    image_size: int = 32,
    question_types: Sequence[str] | Mapping[str, float] = ("color", "shape", "count", "position", "caption"),
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] = DEFAULT_COLORS,
    min_shapes: int = 1,
    max_shapes: int = 3,
    min_size: int | None = None,
    max_size: int | None = None,
    noise: int = 8,
    gap: int = 2,
    max_turns: int = 1,
) -> datasets.Dataset:
    """
    Generate the procedural shapes VQA dataset.

    Args:
        num_samples (`int`, defaults to `10000`):
            Number of rows (one question per image).
        seed (`int`, defaults to `0`):
            Seed of the single RNG stream; the same seed gives byte-identical images.
        image_size (`int`, defaults to `32`):
            Side of the square images, in pixels.
        question_types (`Sequence[str]` or `Mapping[str, float]`):
            Question types to ask, among `color`, `shape`, `count`, `position`, `caption`. A sequence uses the
            default weights (`DEFAULT_QUESTION_WEIGHTS`, colour and shape heaviest); a mapping gives the weights.
        shapes (`Sequence[str]`, defaults to `("circle", "square", "triangle")`):
            Shapes to draw, among `ALL_SHAPES`.
        colors (`Sequence[str]`, defaults to `("red", "green", "blue", "yellow")`):
            Colours to draw, among `PALETTE` (`purple` and `orange` are also available).
        min_shapes (`int`, defaults to `1`):
            Minimum number of shapes per image.
        max_shapes (`int`, defaults to `3`):
            Maximum number of shapes per image.
        min_size (`int`, *optional*):
            Minimum shape side in pixels. Defaults to `max(9, round(0.31 * image_size))` (10 px at 32 px).
        max_size (`int`, *optional*):
            Maximum shape side in pixels. Defaults to `round(0.45 * image_size)` (14 px at 32 px).
        noise (`int`, defaults to `8`):
            Amplitude of the uniform per-pixel noise.
        gap (`int`, defaults to `2`):
            Minimum distance in pixels between two shapes.
        max_turns (`int`, defaults to `1`):
            Up to this many question/answer turns per image: the drawn question first, then the other colour/shape
            questions the image answers unambiguously (only the types with a positive weight). More supervision per
            encoded image for training; `question_type`/`answers` describe the first turn. Evaluation splits stay
            single-turn.

    Returns:
        `datasets.Dataset`: Rows with `images`, `messages`, `answers`, `question_type` and `source="shapes"`.
    """
    weights = _question_weights(question_types)
    cfg = _checked_config(
        weights, shapes, colors, min_shapes, max_shapes, image_size, min_size, max_size, gap, max_turns
    )
    rng = random.Random(seed)
    noise_bank = make_noise_bank(noise, seed, image_size)
    names, probs = list(weights), list(weights.values())
    follow_up_types = {q for q in ("color", "shape") if weights.get(q, 0) > 0}
    columns: dict[str, list] = {"images": [], "messages": [], "answers": [], "question_type": [], "source": []}
    for _ in range(num_samples):
        qtype = rng.choices(names, probs)[0]
        row = _make_row(rng, qtype, cfg, noise_bank, max_turns, follow_up_types)
        for name, value in row.items():
            columns[name].append(value)
    return rows_to_dataset(columns, encoded=True)


def load_shapes(split: str = "train", num_samples: int | None = None, seed: int = 0, **kwargs) -> datasets.Dataset:
    """
    Load a split of the shapes dataset; splits use different derived seeds, so they share no sample.

    Args:
        split (`str`, defaults to `"train"`):
            One of `"train"`, `"validation"`, `"test"`.
        num_samples (`int`, *optional*):
            Number of rows. Defaults to 20,000 for train and 2,000 for validation/test.
        seed (`int`, defaults to `0`):
            Base seed; the split's seed is derived from it and the split name.
        **kwargs:
            Forwarded to `make_shapes_dataset` (`image_size`, `question_types`, `shapes`, `colors`, ...).

    Returns:
        `datasets.Dataset`: The split.
    """
    if split not in DEFAULT_NUM_SAMPLES:
        raise ValueError(f"Unknown split {split!r}; allowed: {tuple(DEFAULT_NUM_SAMPLES)}.")
    num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else num_samples
    return make_shapes_dataset(num_samples=num_samples, seed=_split_seed(seed, split), **kwargs)


def _norm(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def _question_and_target(row: Mapping[str, Any]) -> tuple[str, str]:
    messages = row["messages"]
    user = next(m for m in messages if m["role"] == "user")
    assistant = [m for m in messages if m["role"] == "assistant"]
    question = " ".join(p["text"] for p in user["content"] if p["type"] == "text" and p["text"])
    target = " ".join(p["text"] for p in assistant[-1]["content"] if p["type"] == "text") if assistant else ""
    return question, target


def _rows(data: datasets.Dataset | Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    if isinstance(data, datasets.Dataset):
        # Dropping the image column avoids decoding every image just to read the text.
        return data.select_columns([c for c in ("messages", "answers", "question_type") if c in data.column_names])
    return data


def chance_accuracy(
    data: datasets.Dataset | Iterable[Mapping[str, Any]],
    train_data: datasets.Dataset | Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """
    Accuracy of the best "blind" guess per question type: always answering the most common training answer for the
    exact question text (falling back to the most common answer of the question type for unseen questions).

    This is an upper bound on what a text-only model can score from priors; the shapes dataset keeps it at
    ~1/len(colors) for colour, ~1/len(shapes) for shape and 1/2 for position questions.

    Args:
        data (`datasets.Dataset` or iterable of rows):
            Held-out rows to score.
        train_data (`datasets.Dataset` or iterable of rows, *optional*):
            Rows the answer statistics are taken from. Defaults to `data` itself (an optimistic estimate).

    Returns:
        `dict[str, float]`: Chance accuracy per `question_type`. A guess is right if it matches any reference answer
        (case- and trailing-period-insensitive).

    Example:
    ```python
    >>> from ghostvis_hf.data import load_shapes, chance_accuracy
    >>> chance = chance_accuracy(load_shapes("test", num_samples=500), load_shapes("train", num_samples=2000))
    >>> chance["color"] < 0.4
    True
    ```
    """
    eval_rows = list(_rows(data))
    train_rows = eval_rows if train_data is None else list(_rows(train_data))
    by_question: dict[tuple[str, str], Counter] = defaultdict(Counter)
    by_type: dict[str, Counter] = defaultdict(Counter)
    for row in train_rows:
        question, target = _question_and_target(row)
        by_question[(row["question_type"], question)][_norm(target)] += 1
        by_type[row["question_type"]][_norm(target)] += 1

    correct: Counter = Counter()
    total: Counter = Counter()
    for row in eval_rows:
        question, target = _question_and_target(row)
        qtype = row["question_type"]
        stats = by_question.get((qtype, question)) or by_type.get(qtype)
        guess = stats.most_common(1)[0][0] if stats else ""
        references = {_norm(a) for a in (row.get("answers") or [target])}
        correct[qtype] += guess in references
        total[qtype] += 1
    return {qtype: correct[qtype] / total[qtype] for qtype in sorted(total)}
