"""ANLS (Average Normalized Levenshtein Similarity), the DocVQA / InfographicVQA / ST-VQA metric, as a reward.

Per sample: the best over the references of `1 - edit_distance / max(len)` after lower-casing and collapsing
whitespace, and 0 where that distance is at or above the threshold (0.5), so a near-miss in reading ("Californa")
keeps most of the credit while a different answer gets none. Written from the ST-VQA / DocVQA definition.
"""

from .utils import answer_text, reference_lists

# NOTE: edit distance is quadratic in the lengths; answers in these data sets are a few words, and a degenerate
# completion is cut here rather than costing seconds per sample. A cut this long is far past the threshold anyway.
_MAX_ANLS_CHARS = 1_000


def _normalize(text: str) -> str:
    return " ".join(text[:_MAX_ANLS_CHARS].lower().split())


def levenshtein(a: str, b: str) -> int:
    r"""
    Edit distance (insertions, deletions, substitutions, each costing 1) between two strings.

    Example:
    ```python
    >>> from ghostvis_hf.rewards.anls import levenshtein

    >>> levenshtein("kitten", "sitting")
    3

    ```
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    r"""
    ANLS of one prediction: the best normalized Levenshtein similarity over the references, 0 below `1 - threshold`.

    Args:
        prediction (`str`):
            The predicted answer.
        references (`list[str]`):
            The accepted answers.
        threshold (`float`, *optional*, defaults to 0.5):
            Normalized distances at or above this score 0 (the DocVQA value).

    Returns:
        `float`: the similarity in [0, 1].

    Example:
    ```python
    >>> from ghostvis_hf.rewards.anls import anls_score

    >>> anls_score("Californa", ["California"])
    0.9
    >>> anls_score("Texas", ["California"])
    0.0

    ```
    """
    pred = _normalize(prediction)
    best = 0.0
    for reference in references:
        ref = _normalize(reference)
        longest = max(len(pred), len(ref))
        if longest == 0:
            continue
        distance = levenshtein(pred, ref) / longest
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def anls(completions: list, answers: list[list[str] | str | None] | None = None, **kwargs) -> list[float]:
    r"""
    Reward function that scores each completion with ANLS against the sample's reference answers. If the completion
    contains `<answer>...</answer>`, only the inside of the last pair is scored.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            Completions to score: plain strings or one-message conversations (content a string or text parts).
        answers (`list[list[str] | str | None]`):
            The dataset's `answers` column: the accepted answers of each sample. A sample whose answers are `None`
            or empty gets 0.0.
        **kwargs:
            Other dataset columns and trainer extras; unused.

    Returns:
        `list[float]`: one reward in [0, 1] per completion.

    Raises:
        `ValueError`: if `answers` is missing or not aligned with `completions`.

    Example:
    ```python
    >>> from ghostvis_hf.rewards import anls

    >>> anls(["Californa", "the answer is <answer>42</answer>"], answers=[["California"], "42"])
    [0.9, 1.0]

    ```
    """
    refs = reference_lists(answers, len(completions), "anls")
    return [
        anls_score(answer_text(completion), sample_refs) if sample_refs else 0.0
        for completion, sample_refs in zip(completions, refs, strict=True)
    ]
