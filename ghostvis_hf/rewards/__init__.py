"""Reward functions for TRL's GRPOTrainer / RLOOTrainer, and a name -> function registry for recipe YAML.

Every reward follows TRL's signature `fn(completions, **kwargs) -> list[float]`, accepts plain or conversational
completions, and reads references from the dataset's `answers` column.
"""

from collections.abc import Callable

from .exact_match import exact_match
from .format_reward import format_reward, get_format_reward, tagged_format_reward
from .length_penalty import get_length_penalty, length_penalty
from .relaxed_accuracy import relaxed_accuracy
from .utils import completion_text
from .vqa_accuracy import vqa_accuracy
from .vqa_normalize import normalize_vqa_answer, vqa_soft_accuracy


REWARD_FUNCS: dict[str, Callable] = {
    "vqa_accuracy": vqa_accuracy,
    "exact_match": exact_match,
    "relaxed_accuracy": relaxed_accuracy,
    "format": format_reward,
    "tagged_format": tagged_format_reward,
    "length_penalty": length_penalty,
}


def get_reward_funcs(names: list[str]) -> list[Callable]:
    r"""
    Look up reward functions by their registry name, e.g. from `reward_funcs: [vqa_accuracy, format]` in a recipe.

    Args:
        names (`list[str]`):
            Names from [`REWARD_FUNCS`].

    Returns:
        `list[Callable]`: the reward functions, in the order given.

    Raises:
        `ValueError`: naming the unknown name and the allowed ones.

    Example:
    ```python
    >>> from ghostvis_hf.rewards import get_reward_funcs

    >>> [f.__name__ for f in get_reward_funcs(["vqa_accuracy", "format"])]
    ['vqa_accuracy', 'format_reward']

    ```
    """
    if isinstance(names, str):
        names = [names]
    funcs = []
    for name in names:
        if name not in REWARD_FUNCS:
            raise ValueError(f"Unknown reward function {name!r}; allowed: {', '.join(REWARD_FUNCS)}")
        funcs.append(REWARD_FUNCS[name])
    return funcs


__all__ = [
    "REWARD_FUNCS",
    "completion_text",
    "exact_match",
    "format_reward",
    "get_format_reward",
    "get_length_penalty",
    "get_reward_funcs",
    "length_penalty",
    "normalize_vqa_answer",
    "relaxed_accuracy",
    "tagged_format_reward",
    "vqa_accuracy",
    "vqa_soft_accuracy",
]
