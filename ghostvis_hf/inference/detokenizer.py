"""Incremental detokenization for streaming: token ids in, text deltas out.

Two things make this more than `tokenizer.decode(new_ids)`:
- byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character (one emoji is often 2-3 tokens), so
  bytes are fed through an incremental UTF-8 decoder that only releases whole characters;
- a stop string can span several tokens, so text that could be the start of a stop string is held back until it is
  known not to be one; the stop string itself is never emitted.

For byte-level tokenizers (GPT-2, Qwen2, the tiny tokenizer) each token id maps to fixed bytes, which makes a step
O(1) in Python. Other tokenizers fall back to re-decoding a short window of ids (the vLLM approach).
"""

import codecs
from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode` table (printable stand-ins for the 256 byte values)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTable:
    """Per-tokenizer lookup shared by all requests: bytes of each token id, or `None` when not byte-level.

    Args:
        tokenizer: a `transformers` tokenizer.
        skip_special_tokens (`bool`, *optional*, defaults to `True`): special tokens decode to nothing.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        special = set(tokenizer.all_special_ids)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {i for i, tok in added.items() if getattr(tok, "special", False)}
        self.special_ids = special if skip_special_tokens else set()
        self.table = self._byte_table(tokenizer, added)

    def _byte_table(self, tokenizer, added) -> list[bytes] | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not str(backend.decoder).startswith("ByteLevel"):
            return None
        if getattr(tokenizer, "clean_up_tokenization_spaces", False):
            return None  # decode() would rewrite " ." to "."; only the generic path reproduces that
        decoder = _byte_decoder()
        table = []
        for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if i in self.special_ids or tok is None:
                table.append(b"")
            elif i in added:  # added tokens are stored as plain text, not byte stand-ins
                table.append(added[i].content.encode("utf-8"))
            elif all(ch in decoder for ch in tok):
                table.append(bytes(decoder[ch] for ch in tok))
            else:
                return None
        return table


class IncrementalDetokenizer:
    """Text deltas for one sequence; `push` a token id, get the text that is now safe to show.

    Args:
        table (`TokenTable`): the tokenizer's shared lookup.
        stop (`list[str]`, *optional*): stop strings; after a match `stopped` is `True` and `text` ends before it.
    """

    def __init__(self, table: TokenTable, stop: list[str] | None = None):
        self.table = table
        self.stop = list(stop or [])
        self.stopped = False
        self.text = ""  # everything emitted so far
        self._pending = ""  # decoded but held back (could begin a stop string)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # generic path only
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Adds one token; returns the new text to emit (possibly empty)."""
        if self.stopped:
            return ""
        if self.table.table is not None:
            piece = self._utf8.decode(self.table.table[token_id] if token_id < len(self.table.table) else b"")
        else:
            piece = self._generic(token_id)
        return self._emit(piece, final=False)

    def flush(self) -> str:
        """Ends the sequence: releases held-back text (a trailing partial character becomes U+FFFD)."""
        if self.stopped:
            return ""
        piece = self._utf8.decode(b"", final=True) if self.table.table is not None else self._generic(None)
        return self._emit(piece, final=True)

    def _generic(self, token_id: int | None) -> str:
        """Re-decodes ids[prefix:] and returns what it adds over ids[prefix:read] (vLLM-style)."""
        tok = self.table.tokenizer
        if token_id is not None:
            self._ids.append(token_id)
        prev = tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=bool(self.table.special_ids))
        new = tok.decode(self._ids[self._prefix :], skip_special_tokens=bool(self.table.special_ids))
        if token_id is not None and (len(new) <= len(prev) or new.endswith("\ufffd")):
            return ""  # an incomplete character: wait for the next token
        self._prefix, self._read = max(0, len(self._ids) - 6), len(self._ids)
        return new[len(prev) :]

    def _emit(self, piece: str, final: bool) -> str:
        self._pending += piece
        if not self.stop:
            out, self._pending = self._pending, ""
            self.text += out
            return out
        hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out = self._pending[: min(hits)]
            self.stopped = True
            self._pending = ""
            self.text += out
            return out
        hold = 0
        if not final:
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                    if self._pending.endswith(s[:k]):
                        hold = k
                        break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += out
        return out
