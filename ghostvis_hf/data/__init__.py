"""GhostVis data: the built-in procedural shapes set, adapters for real datasets, and weighted mixtures.

Every loader returns a `datasets.Dataset` in TRL's conversational vision format with one shared schema
(`common.FEATURES`): `images`, `messages` (content always a list of `{"type", "text"}` parts), plus `answers`,
`question_type` and `source` for evaluation. `get_dataset(name, **kwargs)` looks loaders up by the names recipes and
YAML use.
"""

from collections.abc import Callable

import datasets

from .chartqa import load_chartqa
from .coco_captions import load_coco_captions
from .common import ANSWER_STYLES, FEATURES
from .conversations import load_conversations
from .mixture import mix_datasets
from .shapes import chance_accuracy, load_shapes, make_shapes_dataset
from .synthetic import load_synthetic_conversations
from .text_chat import load_text_chat
from .textvqa import load_textvqa
from .vqav2 import load_vqav2


def _load_shapes_entry(
    path_or_hub_id: str | None = None,
    split: str = "train",
    image_root: str | None = None,
    limit: int | None = None,
    **kwargs,
) -> datasets.Dataset:
    # Same call shape as the file-backed adapters, so a mixture spec "shapes::0.8" works; nothing is read from disk.
    del path_or_hub_id, image_root
    kwargs.setdefault("num_samples", limit)
    return load_shapes(split=split, **kwargs)


DATASETS: dict[str, Callable[..., datasets.Dataset]] = {
    "shapes": _load_shapes_entry,
    "coco_captions": load_coco_captions,
    "vqav2": load_vqav2,
    "textvqa": load_textvqa,
    "chartqa": load_chartqa,
    "text_chat": load_text_chat,
    "conversations": load_conversations,
    "synthetic": load_synthetic_conversations,  # generated from a seed: the speed benchmarks' conversations
}


def get_dataset(name: str, **kwargs) -> datasets.Dataset:
    """
    Load a dataset by registry name.

    Args:
        name (`str`):
            One of `shapes`, `coco_captions`, `vqav2`, `textvqa`, `chartqa`, `text_chat`, `conversations` (your own
            data in TRL's conversational format: `load_conversations`).
        **kwargs:
            Forwarded to the loader: `path_or_hub_id`, `split`, `image_root`, `limit` for the adapters; `split`,
            `num_samples` (or `limit`), `seed`, ... for `shapes`.

    Returns:
        `datasets.Dataset`: The loaded dataset in the GhostVis format.

    Example:
    ```python
    >>> from ghostvis_hf.data import get_dataset
    >>> len(get_dataset("shapes", split="test", num_samples=8))
    8
    ```
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; allowed: {sorted(DATASETS)}.")
    return DATASETS[name](**kwargs)


__all__ = [
    "ANSWER_STYLES",
    "DATASETS",
    "FEATURES",
    "chance_accuracy",
    "get_dataset",
    "load_chartqa",
    "load_coco_captions",
    "load_conversations",
    "load_shapes",
    "load_synthetic_conversations",
    "load_text_chat",
    "load_textvqa",
    "load_vqav2",
    "make_shapes_dataset",
    "mix_datasets",
]
