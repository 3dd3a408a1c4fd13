"""VQA soft accuracy as a reward (VQAv2, TextVQA, VizWiz: any dataset with several human answers per question)."""

from .utils import answer_text, reference_lists
from .vqa_normalize import vqa_soft_accuracy


def vqa_accuracy(completions: list, answers: list[list[str] | str | None] | None = None, **kwargs) -> list[float]:
    r"""
    Reward function that scores each completion with the official VQA soft accuracy,
    `mean over leave-one-out subsets of min(1, #matching human answers / 3)`, after VQA answer normalisation
    (see [`~rewards.vqa_normalize.vqa_soft_accuracy`]). A sample with fewer than 3 reference answers (where that
    formula scores a right answer 0 or 1/3) is scored by exact match after the same normalisation, with a warning
    logged once. If the completion contains `<answer>...</answer>`, only the inside of the last pair is scored.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions to score: plain strings or one-message conversations (content a string or text parts).
        answers (`list[list[str] | str | None]`):
            The dataset's `answers` column: the human answers of each sample. A sample whose answers are `None` or
            empty gets 0.0 (rather than TRL's `None` "not applicable", so the reward is always a number).
        **kwargs:
            Other dataset columns and trainer extras; unused.

    Returns:
        `list[float]`: one reward in [0, 1] per completion.

    Raises:
        `ValueError`: if `answers` is missing or not aligned with `completions`.

    Example:
    ```python
    >>> from ghostvis_hf.rewards import vqa_accuracy

    >>> answers = [["2"] * 3 + ["3"] * 7, ["yes"] * 10]
    >>> vqa_accuracy(["two", [{"role": "assistant", "content": "No."}]], answers=answers)
    [0.9, 0.0]
    >>> vqa_accuracy(["The dog."], answers=[["dog"]])  # a single reference: exact match
    [1.0]

    ```
    """
    refs = reference_lists(answers, len(completions), "vqa_accuracy")
    return [
        vqa_soft_accuracy(answer_text(completion), sample_refs) if sample_refs else 0.0
        for completion, sample_refs in zip(completions, refs, strict=True)
    ]
