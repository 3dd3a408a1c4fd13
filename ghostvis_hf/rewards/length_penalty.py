"""Length penalty: nothing within a budget, then linearly down to -1 at four times the budget."""

from collections.abc import Callable

from .utils import completion_text


LENGTH_UNITS = ("words", "chars")


def get_length_penalty(budget: int = 100, unit: str = "words") -> Callable:
    r"""
    Build a reward function that penalises completions longer than `budget`:

    $$
    R(y) = -\mathrm{clip}\left(\frac{|y| - B}{3B}, 0, 1\right)
    $$

    i.e. 0 up to the budget $B$, -1 from four times the budget on. Unlike TRL's `get_soft_overlong_punishment` it
    counts words or characters of the text, not tokens, so it does not depend on the tokenizer.

    Args:
        budget (`int`, *optional*, defaults to `100`):
            Length allowed without penalty.
        unit (`str`, *optional*, defaults to `"words"`):
            `"words"` (whitespace-separated) or `"chars"`.

    Returns:
        `Callable`: a picklable reward function `(completions, **kwargs) -> list[float]`, values in [-1, 0].

    Example:
    ```python
    >>> from ghostvis_hf.rewards import get_length_penalty

    >>> penalty = get_length_penalty(budget=10, unit="chars")
    >>> penalty(["a" * 10, "a" * 25, [{"role": "assistant", "content": "a" * 100}]])
    [0.0, -0.5, -1.0]

    ```
    """
    if unit not in LENGTH_UNITS:
        raise ValueError(f"Unknown length unit {unit!r}; allowed: {', '.join(LENGTH_UNITS)}")
    if budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget}")
    return _LengthPenalty(budget, unit)


class _LengthPenalty:
    # Callable class rather than a closure so the reward stays picklable (see format_reward.py).
    __name__ = "length_penalty"

    def __init__(self, budget: int, unit: str):
        self.budget = budget
        self.unit = unit

    def _length(self, text: str) -> int:
        if self.unit == "chars":
            return len(text.strip())
        # past 4x budget the penalty is saturated, so stop splitting there
        return len(text.split(maxsplit=4 * self.budget))

    def __call__(self, completions: list, **kwargs) -> list[float]:
        rewards = []
        for completion in completions:
            excess = (self._length(completion_text(completion)) - self.budget) / (3 * self.budget)
            rewards.append(0.0 - min(1.0, max(0.0, excess)))  # 0.0 - x, not -x: no -0.0
        return rewards

    def __repr__(self) -> str:
        return f"get_length_penalty(budget={self.budget}, unit={self.unit!r})"


length_penalty = get_length_penalty()
