"""ChartQA relaxed accuracy: numbers within 5 % relative tolerance, anything else exact (case-insensitive).

Follows the ChartQA / Pix2Struct `relaxed_correctness`, with two deliberate differences: a zero target needs a
numerically equal prediction ("0.0" matches "0"; upstream compares strings), and a percent sign on one side only is
read both ways ("50%" matches 50 and 0.5; upstream only reads it as 0.5).
"""

import math
import re

from .utils import MAX_CHARS, answer_text, reference_lists


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def _to_number(text: str) -> tuple[float, bool] | None:
    """`(value, had_percent_sign)`, or None if `text` is not a plain number."""
    text = text.strip()
    percent = text.endswith("%")
    if percent:
        text = text[:-1].rstrip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return (value, percent) if math.isfinite(value) else None


def relaxed_match(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    r"""
    ChartQA relaxed correctness of one prediction against one target.

    Args:
        prediction (`str`):
            The predicted answer (a trailing period is ignored).
        target (`str`):
            The reference answer (a trailing period is ignored).
        max_relative_change (`float`, *optional*, defaults to `0.05`):
            Allowed `|prediction - target| / |target|` when both are numbers.

    Returns:
        `bool`: whether the prediction counts as correct.

    Example:
    ```python
    >>> from ghostvis_hf.rewards.relaxed_accuracy import relaxed_match

    >>> relaxed_match("1,040", "1000"), relaxed_match("1,060", "1000"), relaxed_match("Yes", "yes")
    (True, False, True)

    ```
    """
    # a trailing period on either side is ignored (an identical sentence answer scored 0 when only one side lost it)
    prediction = prediction[:MAX_CHARS].strip().removesuffix(".").strip()
    target = target[:MAX_CHARS].strip().removesuffix(".").strip()
    if not prediction:
        return False
    pred_num, target_num = _to_number(prediction), _to_number(target)
    if pred_num is None or target_num is None:
        return prediction.lower() == target.lower()
    # a "%" on exactly one side: accept both readings (chart axes often say "%" while the label is bare)
    preds = {pred_num[0], pred_num[0] / 100} if pred_num[1] and not target_num[1] else {pred_num[0]}
    targets = {target_num[0], target_num[0] / 100} if target_num[1] and not pred_num[1] else {target_num[0]}
    for p in preds:
        for t in targets:
            if t == 0:
                if p == 0:
                    return True
            elif abs(p - t) / abs(t) <= max_relative_change:
                return True
    return False


def relaxed_accuracy(completions: list, answers: list[list[str] | str | None] | None = None, **kwargs) -> list[float]:
    r"""
    Reward function for ChartQA-style answers: 1.0 if the completion is within 5 % of a numeric reference or equals
    a textual one (case-insensitive), else 0.0; the best over the sample's references (see [`relaxed_match`]). If
    the completion contains `<answer>...</answer>`, only the inside of the last pair is scored.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions to score: plain strings or one-message conversations (content a string or text parts).
        answers (`list[list[str] | str | None]`):
            The dataset's `answers` column: reference answers per sample (ChartQA has one; a single string is
            accepted). A sample whose answers are `None` or empty gets 0.0.
        **kwargs:
            Other dataset columns and trainer extras; unused.

    Returns:
        `list[float]`: one reward in {0.0, 1.0} per completion.

    Raises:
        `ValueError`: if `answers` is missing or not aligned with `completions`.

    Example:
    ```python
    >>> from ghostvis_hf.rewards import relaxed_accuracy

    >>> relaxed_accuracy(["12.4%", "Blue", "7"], answers=[["12"], ["blue"], ["9"]])
    [1.0, 1.0, 0.0]

    ```
    """
    refs = reference_lists(answers, len(completions), "relaxed_accuracy")
    rewards = []
    for completion, sample_refs in zip(completions, refs, strict=True):
        pred = answer_text(completion)
        ok = sample_refs is not None and any(relaxed_match(pred, r) for r in sample_refs)
        rewards.append(1.0 if ok else 0.0)
    return rewards
