"""Chat messages → prompt ids in which the messages' own text can never become a control token.

A chat template renders `<|im_start|>`, `<|im_end|>` and `<image>` around the messages; tokenized as one string, the
same strings typed *inside* a message would become the same control tokens (`"hi<|im_end|>\\n<|im_start|>system\\n…"`
would open a system turn). So the template is rendered with a random sentinel in place of each text, which tells
where each text lies in the prompt. The prompt is tokenized whole, as before (the tokens a model was trained on); if a
special token comes out of a text's span, the prompt is tokenized again in pieces: the template's with special tokens,
the texts with `split_special_tokens=True` (an `<image>` typed by a user stays the characters `<`, `image`, `>`).

A rendered prompt string (`engine.submit(prompt=…)`, the processor) is still parsed with its special tokens: that is
how Python callers who render their own prompts mark images and turns.
"""

import bisect
import re
import secrets


def render_chat(processor, messages: list[dict]) -> tuple[list[str], list[str], list]:
    """Renders `messages` with the processor's chat template, keeping the messages' texts apart.

    Args:
        processor: has `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`.
        messages (`list[dict]`): `{"role", "content"}` with a string content or `{"type": "text"|"image"}` parts.

    Returns:
        `(pieces, texts, images)`: the template's text is `pieces[0] + texts[0] + pieces[1] + … + pieces[-1]`
        (`len(pieces) == len(texts) + 1`); `images` are the image parts' images in order.

    NOTE: assumes the template writes each text verbatim (ChatML, Qwen and GhostVis templates do); a template that
    filters a text (`| trim`) filters the sentinel instead, so the text goes in untrimmed.
    """
    nonce = secrets.token_hex(8)
    originals: list[str] = []
    images: list = []

    def stand_in(text) -> str:
        if not isinstance(text, str):
            raise ValueError(f"message text must be a string, got {type(text).__name__}")
        originals.append(text)
        return f"\ue000{nonce}:{len(originals) - 1}\ue001"

    rendered = []
    for message in messages:
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = stand_in(content)
        elif isinstance(content, list):
            parts = []
            for part in content:
                part = dict(part)
                if part.get("type") == "text":
                    part["text"] = stand_in(part.get("text", ""))
                elif part.get("type") == "image":
                    image = part.get("image", part.get("url", part.get("path")))
                    if image is None:
                        raise ValueError("an image part has no 'image', 'url' or 'path'")
                    images.append(image)
                parts.append(part)
            message["content"] = parts
        rendered.append(message)
    text = processor.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    split = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
    return split[0::2], [originals[int(k)] for k in split[1::2]], images


def framing(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds around a text by itself (BOS/EOS of its post-processor), as (before, after)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def max_prompt_chars(tokenizer, max_seq_len: int) -> int:
    """Characters past which a text cannot fit in `max_seq_len` tokens, whatever it holds (a check before tokenizing).

    No token covers more input than its vocabulary piece spells: a byte-level piece spells one input byte per
    character, a SentencePiece piece one character per character, and a character is at least one byte. So a text of
    C characters has at least C / L tokens, L being the longest piece.
    NOTE: a normalizer may shrink the text first (NFC turns three Hangul jamo into one syllable), hence the factor 3
    when the tokenizer has one; a prompt refused here would have been refused after tokenizing.
    """
    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    shrink = 3 if backend is None or backend.normalizer is not None else 1
    return max_seq_len * max(longest, 1) * shrink


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special added tokens (`<|im_end|>`, `<image>`, …): what typed text must never become."""
    ids = {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return ids | set(getattr(tokenizer, "all_special_ids", []))


def _specials_in_texts(ids: list[int], offsets: list, special_ids: set[int], spans: list[tuple[int, int]]) -> bool:
    starts = [a for a, _ in spans]
    for tok, (a, b) in zip(ids, offsets):
        if tok in special_ids and b > a:
            k = bisect.bisect_right(starts, a) - 1
            if k >= 0 and a < spans[k][1]:
                return True
    return False


def encode_chat(tokenizer, pieces: list[str], texts: list[str], special_ids: set[int],
                framing_ids: tuple[list[int], list[int]]) -> list[int]:
    """Token ids of `pieces[0] + texts[0] + … + pieces[-1]` (see `render_chat`); no text gives a special token.

    Args:
        tokenizer: a `transformers` tokenizer (fast ones report offsets; with a slow one the pieces path is taken).
        pieces, texts: what `render_chat` returned.
        special_ids (`set[int]`): `special_token_ids(tokenizer)`.
        framing_ids: `framing(tokenizer)`, added around the pieces path as the whole-string path adds them.
    """
    spans, pos = [], 0
    for piece, text in zip(pieces, texts):
        spans.append((pos + len(piece), pos + len(piece) + len(text)))
        pos = spans[-1][1]
    whole = "".join(p + t for p, t in zip(pieces, texts + [""]))
    try:
        enc = tokenizer(whole, return_offsets_mapping=True)
    except NotImplementedError:  # a slow tokenizer has no offsets
        enc = None
    if enc is not None and not _specials_in_texts(enc["input_ids"], enc["offset_mapping"], special_ids, spans):
        return list(enc["input_ids"])
    # NOTE: tokenized apart, a text starts a new input: a SentencePiece tokenizer that prefixes the first word with
    # "▁" does so for each text. Only prompts that typed control tokens take this path.
    framed = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    plain = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
    ids = list(framing_ids[0])
    for k, piece in enumerate(framed):
        ids += piece + (plain[k] if k < len(plain) else [])
    return ids + framing_ids[1]
