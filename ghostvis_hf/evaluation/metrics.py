"""Dataset-level metrics for `ghostvis eval`: VQA accuracy, exact match, ChartQA relaxed accuracy, ANLS, CIDEr / BLEU-4.

The per-sample scores are the reward functions' own (`ghostvis_hf.rewards`), so what GRPO optimises and what
eval reports cannot drift apart. Caption metrics use pycocoevalcap's scorers but not its PTBTokenizer (it shells
out to Java): captions are lower-cased and split into words here, so scores are close to, not identical with,
the COCO server's.
"""

import re

from ghostvis_hf.rewards.anls import anls as _anls_reward
from ghostvis_hf.rewards.exact_match import exact_match as _exact_match_reward
from ghostvis_hf.rewards.relaxed_accuracy import relaxed_accuracy as _relaxed_accuracy_reward
from ghostvis_hf.rewards.utils import MAX_CHARS
from ghostvis_hf.rewards.vqa_accuracy import vqa_accuracy as _vqa_accuracy_reward


def _mean_of_reward(reward_func, predictions: list[str], references: list, name: str) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{name}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError(f"{name}: no predictions to score")
    scores = reward_func(list(predictions), answers=list(references))
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: list[str], references: list[list[str] | str]) -> float:
    r"""
    Mean VQA soft accuracy (VQAv2 / TextVQA / VizWiz) over a dataset.

    Args:
        predictions (`list[str]`):
            One predicted answer per question.
        references (`list[list[str] | str]`):
            The human answers of each question (10 for VQAv2/TextVQA).

    Returns:
        `float`: accuracy in [0, 1] (multiply by 100 for the usual leaderboard number).

    Example:
    ```python
    >>> from ghostvis_hf.evaluation import vqa_accuracy

    >>> vqa_accuracy(["two", "yes"], [["2"] * 3 + ["3"] * 7, ["yes"] * 10])
    0.95

    ```
    """
    return _mean_of_reward(_vqa_accuracy_reward, predictions, references, "vqa_accuracy")


def exact_match(predictions: list[str], references: list[list[str] | str]) -> float:
    r"""
    Fraction of predictions equal to one of their references after light normalisation (lower-case, trailing
    punctuation and articles dropped).

    Args:
        predictions (`list[str]`):
            One predicted answer per sample.
        references (`list[list[str] | str]`):
            The reference answer(s) of each sample.

    Returns:
        `float`: exact-match rate in [0, 1].

    Example:
    ```python
    >>> from ghostvis_hf.evaluation import exact_match

    >>> exact_match(["The dog.", "cat"], [["dog"], "bird"])
    0.5

    ```
    """
    return _mean_of_reward(_exact_match_reward, predictions, references, "exact_match")


def relaxed_accuracy(predictions: list[str], references: list[list[str] | str]) -> float:
    r"""
    ChartQA relaxed accuracy: numbers within 5 % relative tolerance, other answers exact (case-insensitive).

    Args:
        predictions (`list[str]`):
            One predicted answer per question.
        references (`list[list[str] | str]`):
            The reference answer(s) of each question; a prediction counts if it matches any.

    Returns:
        `float`: relaxed accuracy in [0, 1].

    Example:
    ```python
    >>> from ghostvis_hf.evaluation import relaxed_accuracy

    >>> relaxed_accuracy(["10.4", "Blue", "7"], [["10"], ["blue"], ["9"]])
    0.6666666666666666

    ```
    """
    return _mean_of_reward(_relaxed_accuracy_reward, predictions, references, "relaxed_accuracy")


def anls(predictions: list[str], references: list[list[str] | str]) -> float:
    r"""
    Mean ANLS (DocVQA's Average Normalized Levenshtein Similarity, threshold 0.5) over a dataset.

    Args:
        predictions (`list[str]`):
            One predicted answer per question.
        references (`list[list[str] | str]`):
            The accepted answer(s) of each question; the closest one counts.

    Returns:
        `float`: ANLS in [0, 1].

    Example:
    ```python
    >>> from ghostvis_hf.evaluation import anls

    >>> anls(["Californa", "Texas"], [["California"], ["Ohio"]])
    0.45

    ```
    """
    return _mean_of_reward(_anls_reward, predictions, references, "anls")


# The metrics `ghostvis eval --metric` can name: one score per row, averaged.
METRICS = {"exact_match": exact_match, "vqa_accuracy": vqa_accuracy, "relaxed_accuracy": relaxed_accuracy,
           "anls": anls}


_WORD = re.compile(r"\w+(?:'\w+)*")


def _tokenize(caption: str) -> str:
    # stands in for PTBTokenizer (Java): lower-case, drop punctuation, keep in-word apostrophes
    return " ".join(_WORD.findall(caption[:MAX_CHARS].lower()))


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    r"""
    Corpus CIDEr (pycocoevalcap's, i.e. CIDEr-D) and BLEU-4 of generated captions.

    CIDEr weighs n-grams by their rarity across the *whole* reference set, so it is only meaningful on a real test
    set: with a single image every n-gram is in every document and CIDEr is 0.

    Args:
        predictions (`list[str]`):
            One generated caption per image.
        references (`list[list[str]]`):
            The reference captions of each image (at least one; COCO has 5).

    Returns:
        `dict[str, float]`: `{"CIDEr": ..., "BLEU-4": ...}`; BLEU-4 in [0, 1], CIDEr unbounded (~1 for a good model).

    Raises:
        `ImportError`: if pycocoevalcap is not installed.
        `ValueError`: on mismatched lengths, no predictions, or an image without references.

    Example:
    ```python
    >>> from ghostvis_hf.evaluation import caption_scores

    >>> refs = [["a dog runs on the grass", "a dog running"], ["two cats sleep on a red sofa", "cats on a sofa"]]
    >>> scores = caption_scores(["A dog runs on the grass.", "Two cats sleep on a red sofa."], refs)
    >>> round(scores["BLEU-4"], 3), scores["CIDEr"] > 1
    (1.0, True)

    ```
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError("caption_scores needs pycocoevalcap: pip install ghostvis-hf[eval]") from e

    if len(predictions) != len(references):
        raise ValueError(f"caption_scores: {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("caption_scores: no predictions to score")
    res, gts = {}, {}
    for i, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        if isinstance(refs, str):
            refs = [refs]
        refs = [r for r in refs if r is not None]
        if not refs:
            raise ValueError(f"caption_scores: image {i} has no reference captions")
        res[i] = [_tokenize(pred or "")]
        gts[i] = [_tokenize(r) for r in refs]

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"CIDEr": float(cider), "BLEU-4": float(bleu[3])}
