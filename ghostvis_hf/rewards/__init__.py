"""Reward functions for TRL's GRPOTrainer / RLOOTrainer, and a name -> function registry for recipe YAML.

Every reward follows TRL's signature `fn(completions, **kwargs) -> list[float]`, accepts plain or conversational
completions, and reads references from the dataset's `answers` column. Rewards made by a factory (format, length) take
their arguments from the recipe's `reward_kwargs`, like open-r1's `get_reward_funcs(script_args)`.
"""

import inspect
from collections.abc import Callable
from functools import partial

from .anls import anls
from .exact_match import exact_match
from .format_reward import format_reward, get_format_reward, tagged_format_reward
from .length_penalty import get_length_penalty, length_penalty
from .relaxed_accuracy import relaxed_accuracy
from .utils import completion_text
from .vqa_accuracy import vqa_accuracy
from .vqa_normalize import normalize_vqa_answer, vqa_soft_accuracy


# The rewards under their default arguments.
REWARD_FUNCS: dict[str, Callable] = {
    "vqa_accuracy": vqa_accuracy,
    "exact_match": exact_match,
    "relaxed_accuracy": relaxed_accuracy,
    "anls": anls,
    "format": format_reward,
    "tagged_format": tagged_format_reward,
    "length_penalty": length_penalty,
}
# The names whose reward a factory builds, and the factory: `reward_kwargs[name]` are its keyword arguments.
REWARD_FACTORIES: dict[str, Callable[..., Callable]] = {
    "format": partial(get_format_reward, "short"),
    "tagged_format": partial(get_format_reward, "tagged", max_words=None),
    "length_penalty": get_length_penalty,
}


def get_reward_funcs(names: list[str], reward_kwargs: dict[str, dict] | None = None) -> list[Callable]:
    r"""
    Look up reward functions by their registry name, e.g. from `reward_funcs: [vqa_accuracy, format]` in a recipe, and
    build the configurable ones with their arguments, e.g. `reward_kwargs: {length_penalty: {budget: 16}}`.

    Args:
        names (`list[str]`):
            Names from [`REWARD_FUNCS`].
        reward_kwargs (`dict[str, dict]`, *optional*):
            Per name, keyword arguments of its factory in [`REWARD_FACTORIES`]; the other names keep their defaults.

    Returns:
        `list[Callable]`: the reward functions, in the order given.

    Raises:
        `ValueError`: naming an unknown reward, arguments for a reward that takes none or that `names` leaves out, or
        an argument its factory does not have, together with what is allowed.

    Example:
    ```python
    >>> from ghostvis_hf.rewards import get_reward_funcs

    >>> [f.__name__ for f in get_reward_funcs(["vqa_accuracy", "format"])]
    ['vqa_accuracy', 'format_reward']
    >>> get_reward_funcs(["exact_match", "length_penalty"], {"length_penalty": {"budget": 16}})[1]
    get_length_penalty(budget=16, unit='words')

    ```
    """
    if isinstance(names, str):
        names = [names]
    reward_kwargs = dict(reward_kwargs or {})
    for name in [*names, *reward_kwargs]:
        if name not in REWARD_FUNCS:
            raise ValueError(f"Unknown reward function {name!r}; allowed: {', '.join(REWARD_FUNCS)}")
    left_out = [name for name in reward_kwargs if name not in names]
    if left_out:
        raise ValueError(f"reward_kwargs configures {left_out}, which reward_funcs {list(names)} does not name")
    return [_build(name, reward_kwargs.get(name)) for name in names]


def _build(name: str, kwargs: dict | None) -> Callable:
    if kwargs is None:
        return REWARD_FUNCS[name]
    if name not in REWARD_FACTORIES:
        raise ValueError(f"Reward {name!r} takes no arguments; configurable: {', '.join(REWARD_FACTORIES)}")
    factory = REWARD_FACTORIES[name]
    allowed = list(inspect.signature(factory).parameters)
    if not isinstance(kwargs, dict):
        raise ValueError(f"reward_kwargs[{name!r}] must map argument names to values, got {kwargs!r}")
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ValueError(f"Unknown argument(s) {unknown} for reward {name!r}; allowed: {', '.join(allowed)}")
    return factory(**kwargs)


__all__ = [
    "REWARD_FACTORIES",
    "REWARD_FUNCS",
    "anls",
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
