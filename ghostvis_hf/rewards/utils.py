"""Helpers shared by the reward functions: completion text, answer extraction, reference columns.

TRL hands a reward function either plain strings (standard prompts) or one-message conversations
(conversational prompts), and every extra dataset column as a kwarg list aligned with `completions`.
Everything that differs between those shapes is absorbed here so each reward is a few lines.
"""

from collections.abc import Sequence


# NOTE: normalising/regex work is done on at most this many characters. A degenerate policy can emit
# megabytes; no answer we score is anywhere near this long, so the cap never changes a sane result.
MAX_CHARS = 10_000


def completion_text(completion) -> str:
    r"""
    Text of one completion, whatever shape TRL gives it.

    Args:
        completion (`str`, `dict` or `list[dict]`):
            A plain string, a message `{"role": "assistant", "content": ...}`, or a list of messages. A message's
            `content` may be a string or a list of parts `{"type": "text", "text": ...}`; non-text parts are
            ignored. The text of all messages is concatenated (TRL gives exactly one).

    Returns:
        `str`: the completion's text (`""` for `None` or anything without text).

    Example:
    ```python
    >>> from ghostvis_hf.rewards.utils import completion_text

    >>> completion_text("2 dogs")
    '2 dogs'
    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "2 dogs"}]}])
    '2 dogs'

    ```
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence):
        return "".join(completion_text(message) for message in completion)
    raise TypeError(f"Cannot read a completion of type {type(completion).__name__}: expected str or messages")


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # multimodal content: a list of typed parts
    return "".join(part.get("text") or "" for part in content if isinstance(part, dict) and part.get("type") == "text")


def answer_text(completion) -> str:
    r"""
    The answer to score in a completion: the inside of the last `<answer>...</answer>` pair if there is one,
    else the whole text; stripped and capped at `MAX_CHARS` characters.

    Extracting the tagged answer lets the same accuracy reward serve prompts that ask for a bare short answer and
    prompts that ask for reasoning followed by `<answer>...</answer>`.

    Args:
        completion (`str` or messages):
            One completion, as accepted by [`completion_text`].

    Returns:
        `str`: the answer text.

    Example:
    ```python
    >>> from ghostvis_hf.rewards.utils import answer_text

    >>> answer_text("I count them. <answer> 2 </answer>")
    '2'
    >>> answer_text("two")
    'two'

    ```
    """
    text = completion_text(completion)
    # str.rfind rather than a regex: linear on any input, no backtracking on megabyte completions
    end = text.rfind("</answer>")
    if end != -1:
        start = text.rfind("<answer>", 0, end)
        if start != -1:
            text = text[start + len("<answer>") : end]
    return text[:MAX_CHARS].strip()


def reference_lists(answers, n: int, reward_name: str) -> list[list[str] | None]:
    r"""
    Validate the `answers` column TRL passes as a kwarg and turn it into one list of reference strings per sample.

    Args:
        answers (`list[list[str] | str | None]` or `None`):
            The `answers` column: per sample a list of reference answers, a single string, or `None`.
        n (`int`):
            Number of completions; `answers` must be aligned with them.
        reward_name (`str`):
            Name used in error messages.

    Returns:
        `list[list[str] | None]`: per sample the references (`None` entries inside a list dropped), or `None` when
        the sample has no usable reference (such samples are scored 0.0 by the rewards).

    Raises:
        `ValueError`: when the column is missing or its length differs from the number of completions.
    """
    if answers is None:
        raise ValueError(
            f"{reward_name} needs an 'answers' column in the dataset (a list of reference answers per sample); "
            "TRL passes every extra dataset column to the reward functions as a keyword argument."
        )
    if isinstance(answers, str) or len(answers) != n:
        got = "a single string" if isinstance(answers, str) else f"{len(answers)} answers"
        raise ValueError(f"{reward_name} got {n} completions but {got}: 'answers' must be aligned with completions")
    refs = []
    for sample in answers:
        if sample is None:
            refs.append(None)
            continue
        if isinstance(sample, str):
            sample = [sample]
        sample = [str(a) for a in sample if a is not None]
        refs.append(sample or None)
    return refs
