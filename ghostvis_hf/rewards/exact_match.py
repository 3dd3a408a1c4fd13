"""Exact match after light normalisation, for datasets with one (or a few) canonical short answers."""

import re

from .utils import MAX_CHARS, answer_text, reference_lists


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_TRAILING_PUNCT = ".,;:!?"


def normalize_text(text: str) -> str:
    r"""
    Lower-case, strip, drop trailing punctuation and the articles a/an/the, collapse whitespace.

    Args:
        text (`str`):
            Text to normalise; only its first `MAX_CHARS` characters are read.

    Returns:
        `str`: the normalised text.

    Example:
    ```python
    >>> from ghostvis_hf.rewards.exact_match import normalize_text

    >>> normalize_text("  The Dog. ")
    'dog'

    ```
    """
    text = text[:MAX_CHARS].lower().strip().rstrip(_TRAILING_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(completions: list, answers: list[list[str] | str | None] | None = None, **kwargs) -> list[float]:
    r"""
    Reward function that gives 1.0 when the completion equals any reference answer after [`normalize_text`], else
    0.0. If the completion contains `<answer>...</answer>`, only the inside of the last pair is compared.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions to score: plain strings or one-message conversations (content a string or text parts).
        answers (`list[list[str] | str | None]`):
            The dataset's `answers` column: reference answers per sample (a single string is one reference). A
            sample whose answers are `None` or empty gets 0.0.
        **kwargs:
            Other dataset columns and trainer extras; unused.

    Returns:
        `list[float]`: one reward in {0.0, 1.0} per completion.

    Raises:
        `ValueError`: if `answers` is missing or not aligned with `completions`.

    Example:
    ```python
    >>> from ghostvis_hf.rewards import exact_match

    >>> exact_match(["The dog.", [{"role": "assistant", "content": "a cat"}]], answers=[["dog"], "dog"])
    [1.0, 0.0]

    ```
    """
    refs = reference_lists(answers, len(completions), "exact_match")
    rewards = []
    for completion, sample_refs in zip(completions, refs, strict=True):
        pred = normalize_text(answer_text(completion))
        ok = bool(pred) and sample_refs is not None and any(pred == normalize_text(r) for r in sample_refs)
        rewards.append(1.0 if ok else 0.0)
    return rewards
