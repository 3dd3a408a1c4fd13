"""Format rewards: did the completion answer in the requested form (a short bare answer, or one `<answer>` tag)?"""

import re
from collections.abc import Callable

from .utils import completion_text


FORMAT_MODES = ("short", "tagged")

# with exactly one opening and one closing tag (checked first with str.count), this search is linear
_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def get_format_reward(mode: str = "short", max_words: int | None = 5) -> Callable:
    r"""
    Build a reward function that gives 1.0 to completions in the requested form and 0.0 to the others.

    - `"short"`: the whole completion is a bare answer: non-empty, a single line (surrounding whitespace ignored),
      at most `max_words` words.
    - `"tagged"`: `<answer>...</answer>` appears exactly once, with non-empty content of at most `max_words` words;
      text before or after it (e.g. reasoning) is allowed.

    Args:
        mode (`str`, *optional*, defaults to `"short"`):
            One of `"short"` or `"tagged"`.
        max_words (`int` or `None`, *optional*, defaults to `5`):
            Most whitespace-separated words allowed in the answer; `None` for no limit.

    Returns:
        `Callable`: a reward function `(completions, **kwargs) -> list[float]`, picklable (a callable object, as
        TRL's own reward factories return, because async rollout workers pickle reward functions).

    Example:
    ```python
    >>> from ghostvis_hf.rewards import get_format_reward

    >>> short = get_format_reward("short", max_words=3)
    >>> short(["two dogs", "There are two dogs here.", "two\ndogs", [{"role": "assistant", "content": "2"}]])
    [1.0, 0.0, 0.0, 1.0]
    >>> tagged = get_format_reward("tagged", max_words=None)
    >>> tagged(["Two are visible. <answer>2</answer>", "<answer>2</answer><answer>3</answer>", "2"])
    [1.0, 0.0, 0.0]

    ```
    """
    if mode not in FORMAT_MODES:
        raise ValueError(f"Unknown format mode {mode!r}; allowed: {', '.join(FORMAT_MODES)}")
    if max_words is not None and max_words < 1:
        raise ValueError(f"max_words must be a positive integer or None, got {max_words}")
    return _FormatReward(mode, max_words)


class _FormatReward:
    # Callable class rather than a closure so the reward stays picklable (TRL's async GRPO rollout worker pickles
    # reward functions); TRL logs each reward under its `__name__`.
    def __init__(self, mode: str, max_words: int | None):
        self.mode = mode
        self.max_words = max_words
        self.__name__ = "format_reward" if mode == "short" else "tagged_format_reward"

    def _short_enough(self, answer: str) -> bool:
        if self.max_words is None:
            return True
        # maxsplit bounds the work on a megabyte completion
        return len(answer.split(maxsplit=self.max_words)) <= self.max_words

    def _ok(self, text: str) -> bool:
        if self.mode == "short":
            text = text.strip()
            return bool(text) and "\n" not in text and "\r" not in text and self._short_enough(text)
        if text.count("<answer>") != 1 or text.count("</answer>") != 1:
            return False
        match = _TAGGED.search(text)
        return match is not None and bool(match.group(1).strip()) and self._short_enough(match.group(1))

    def __call__(self, completions: list, **kwargs) -> list[float]:
        return [1.0 if self._ok(completion_text(c)) else 0.0 for c in completions]

    def __repr__(self) -> str:
        return f"get_format_reward(mode={self.mode!r}, max_words={self.max_words})"


format_reward = get_format_reward("short", max_words=5)
tagged_format_reward = get_format_reward("tagged", max_words=None)
