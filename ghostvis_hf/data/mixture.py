"""Weighted mixtures of datasets (e.g. 80% vision, 20% text-only chat), deterministic from a seed.

Why not `datasets.interleave_datasets(probabilities=...)`: it draws the source of every row at random, so the
realised proportions drift from the weights (noticeably on small mixtures), and its length is set by the stopping
strategy rather than asked for. Here each source gets an exact quota (largest-remainder rounding of
`num_samples * weight`), rows are picked without replacement (a source smaller than its quota is repeated in fresh
shuffles), and the result is shuffled. `select` + `concatenate_datasets` only build an index mapping: no data is
copied.
"""

import logging
import math
from collections.abc import Sequence

import datasets
import numpy as np


logger = logging.getLogger(__name__)


def quotas(weights: list[float], total: int) -> list[int]:
    """`total` split by `weights` by largest remainder: exact total, each quota within 1 of `total * p`."""
    raw = [total * w / sum(weights) for w in weights]
    out = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


def _align(parts: list[datasets.Dataset]) -> list[datasets.Dataset]:
    """Keep the columns all parts share and cast every part to the first one's features."""
    columns = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    if "messages" not in columns:
        raise ValueError("Every dataset in a mixture needs a `messages` column.")
    dropped = sorted({c for p in parts for c in p.column_names} - set(columns))
    if dropped:
        logger.warning("mix_datasets: dropping columns not shared by every dataset: %s", dropped)
    parts = [p.select_columns(columns) for p in parts]
    features = parts[0].features
    aligned = []
    for i, part in enumerate(parts):
        if part.features != features:
            try:
                part = part.cast(features)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"Dataset {i} of the mixture has features {part.features} that cannot be cast to those of "
                    f"dataset 0 ({features}). Build both with the ghostvis_hf.data loaders (shared schema)."
                ) from err
        aligned.append(part)
    return aligned


def mix_datasets(
    datasets_and_weights: Sequence[tuple[datasets.Dataset, float]],
    num_samples: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """
    Mix datasets with the given weights, deterministically.

    Args:
        datasets_and_weights (`Sequence[tuple[datasets.Dataset, float]]`):
            `(dataset, weight)` pairs; weights are relative (normalised to sum to 1) and must be positive.
        num_samples (`int`, *optional*):
            Size of the mixture. Defaults to the largest size at which no dataset has to repeat a row.
        seed (`int`, defaults to `0`):
            Seed of the row selection and final shuffle.

    Returns:
        `datasets.Dataset`: `num_samples` rows, `round(num_samples * weight / sum(weights))` (+-1) from each
        dataset, shuffled, with the columns all inputs share.

    Example:
    ```python
    >>> import json
    >>> from collections import Counter
    >>> from ghostvis_hf.data import load_shapes, load_text_chat, mix_datasets
    >>> with open("chat.jsonl", "w") as f:  # a tiny text-only chat set
    ...     for i in range(20):
    ...         turns = [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]
    ...         _ = f.write(json.dumps({"messages": turns}) + "\\n")
    >>> mixed = mix_datasets(
    ...     [(load_shapes("train", num_samples=100), 0.8), (load_text_chat("chat.jsonl"), 0.2)], num_samples=50
    ... )
    >>> sorted(Counter(mixed["source"]).items())
    [('shapes', 40), ('text_chat', 10)]
    ```
    """
    if not datasets_and_weights:
        raise ValueError("mix_datasets needs at least one (dataset, weight) pair.")
    parts, weights = zip(*datasets_and_weights)
    weights = [float(w) for w in weights]
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ValueError(f"Mixture weights must be positive and finite, got {weights}.")
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"Datasets {empty} of the mixture are empty.")
    if num_samples is not None and num_samples < 0:
        raise ValueError(f"num_samples must be >= 0 or None, got {num_samples}.")
    parts = _align(list(parts))

    if num_samples is None:
        # The largest mixture in which every source fits its quota without repeating a row.
        num_samples = min(math.floor(len(p) * sum(weights) / w + 1e-9) for p, w in zip(parts, weights))
    rng = np.random.default_rng(seed)
    selected = []
    for part, quota in zip(parts, quotas(weights, num_samples)):
        epochs = -(-quota // len(part))  # a source smaller than its quota is repeated, each pass reshuffled
        indices = np.concatenate([rng.permutation(len(part)) for _ in range(max(epochs, 1))])[:quota]
        if epochs > 1:
            logger.warning("mix_datasets: repeating a %d-row dataset %d times to fill its quota.", len(part), epochs)
        selected.append(part.select(indices))
    mixed = datasets.concatenate_datasets(selected)
    return mixed.select(rng.permutation(len(mixed)))
