"""VQA answer normalisation and soft accuracy, following the official VQAv2 evaluation (vqaEval.py).

Written from the official rules, including their quirks, so scores match the leaderboard:
- punctuation: each mark in `_PUNCT` is deleted when it touches a space somewhere in the answer, or when the answer
  has a comma between two digits ("1,000" -> "1000"); otherwise it becomes a space ("yes/no" -> "yes no");
- a period is deleted unless a digit follows it ("dog." -> "dog", "3.5" stays). The official regex meant a
  look-behind but wrote `(?!<=\\d)`, which is always true, so the preceding character does not matter;
- lower-case, number words zero..ten (and "none") -> digits, articles a/an/the dropped, contractions restored
  ("dont" -> "don't"), whitespace collapsed.
TextVQA uses the same metric (mmf's EvalAIAnswerProcessor is this normalisation).

NOTE: the leave-one-out soft accuracy needs several human answers: with one reference it is always 0 (no *other*
answer agrees) and with two it tops out at 1/3, so a single-answer data set scored 0.0 for a 98 % right model. With
fewer than `MIN_VQA_ANSWERS` references `vqa_soft_accuracy` is exact match under the same normalisation instead
(warned once per process).
"""

import functools
import logging
import re

from .utils import MAX_CHARS

logger = logging.getLogger(__name__)
# The fewest references the leave-one-out formula can score a right answer 1.0 with (`min(1, matches / 3)`).
MIN_VQA_ANSWERS = 3

# fmt: off
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# The official list, minus its capitalised keys ("Im", "Ive", "Id've", "I'dve"): the lookup runs after
# lower-casing, so those never matched. "somebody'd" -> "somebodyd" is backwards but official, so it stays.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# fmt: on

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
    # the delete-vs-space decision looks at the *input*, for every mark, exactly as the official loop does
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        if p not in out:
            continue
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # NOTE: the official call passes re.UNICODE as `count`, capping this at 32 periods; no real answer has that many
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
    r"""
    Normalise an answer the way the official VQAv2 evaluation does (see the module docstring for the rules).

    Args:
        answer (`str`):
            A predicted or human answer. Only its first `MAX_CHARS` characters are read.

    Returns:
        `str`: the normalised answer.

    Example:
    ```python
    >>> from ghostvis_hf.rewards.vqa_normalize import normalize_vqa_answer

    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    >>> normalize_vqa_answer("1,000")
    '1000'
    >>> normalize_vqa_answer("The man dont know")
    "man don't know"

    ```
    """
    text = answer[:MAX_CHARS].replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: list[str] | str) -> float:
    r"""
    VQA soft accuracy of one prediction against the human answers.

    For each human answer, the prediction scores `min(1, matches among the *other* answers / 3)`; the result is the
    mean over all answers (the 10 leave-one-out subsets for VQAv2/TextVQA, or however many answers are given).
    With fewer than `MIN_VQA_ANSWERS` (3) answers that formula cannot reach 1, so the score is exact match instead:
    1.0 if the prediction equals any answer after normalisation, else 0.0 (a warning is logged once).
    Both the prediction and the answers are normalised with [`normalize_vqa_answer`] (raw TextVQA answers need it;
    the official VQAv2 answers are already normalised, so it changes nothing there).

    Args:
        prediction (`str`):
            The predicted answer.
        answers (`list[str]` or `str`):
            The human answers (10 for VQAv2/TextVQA); a single string counts as one answer.

    Returns:
        `float`: the accuracy in [0, 1]; 0.0 for an empty prediction or no answers.

    Example:
    ```python
    >>> from ghostvis_hf.rewards.vqa_normalize import vqa_soft_accuracy

    >>> vqa_soft_accuracy("two", ["2"] * 3 + ["3"] * 7)  # 3 matches: 7 subsets see 3, 3 subsets see 2
    0.9
    >>> vqa_soft_accuracy("2", ["2"] * 10)
    1.0
    >>> vqa_soft_accuracy("Two.", ["2"])  # one reference: exact match after normalisation
    1.0

    ```
    """
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_vqa_answer(prediction)
    if not pred or not answers:
        return 0.0
    matches = sum(normalize_vqa_answer(a) == pred for a in answers)
    if len(answers) < MIN_VQA_ANSWERS:
        _warn_few_answers()
        return 1.0 if matches else 0.0
    # leaving out a matching answer leaves matches-1 among the others; leaving out any other leaves all of them
    total = matches * min(1.0, (matches - 1) / 3) + (len(answers) - matches) * min(1.0, matches / 3)
    return total / len(answers)


@functools.cache
def _warn_few_answers() -> None:
    logger.warning(
        "VQA accuracy: a sample has fewer than %d reference answers, where leave-one-out soft accuracy is always 0 "
        "(one answer) or at most 1/3 (two); such samples are scored by exact match (after VQA normalisation) instead",
        MIN_VQA_ANSWERS,
    )
