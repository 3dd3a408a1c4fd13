"""The request side of the engine: intake (tokenize, validate, prepare images) and what `submit` returns.

Everything that can be wrong with a request is found here, in the caller's thread, before it is queued: a server
can answer 400 at once and the scheduler thread only ever sees requests that fit.
A `RequestHandle` is written by the scheduler thread and read by any number of consumer threads or one asyncio
task, so every event goes through a condition variable (and, for async consumers, a loop-safe wake-up).
"""

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

from ..processing_ghostvis import image_placeholder_run
from .prompt import encode_chat, framing, max_prompt_chars, render_chat, special_token_ids
from .sampling import SamplingParams
from .vision_cache import ImagePreparer, PreparedImage


class ContextLengthError(ValueError):
    """The prompt plus the requested new tokens do not fit in the engine's context."""


@dataclass
class StreamEvent:
    """A piece of one sample's output: new text (maybe empty), the token, and a finish reason on its last event."""

    index: int
    text: str
    token_id: int | None
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None


class RequestHandle:
    """A submitted request: iterate it (or `async for` over `events_async()`) for `StreamEvent`s, or call `result()`."""

    def __init__(self, request_id: int, n: int, prompt_tokens: int):
        self.id, self.n, self.prompt_tokens = request_id, n, prompt_tokens
        self.results: list[GenerationResult | None] = [None] * n
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self._events: deque[StreamEvent] = deque()
        self._cond = threading.Condition()
        self._waker = None  # (loop, asyncio.Event) of an async consumer

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.results)

    def _push(self, event: StreamEvent, result: GenerationResult | None = None) -> None:
        with self._cond:
            if result is not None:
                self.results[result.index] = result
            self._events.append(event)
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            waker[0].call_soon_threadsafe(waker[1].set)

    def __iter__(self):
        while True:
            with self._cond:
                while not self._events and not self.done:
                    self._cond.wait()
                if not self._events:
                    return
                event = self._events.popleft()
            yield event

    async def events_async(self):
        """Async iterator over the events (for servers); never blocks the event loop."""
        import asyncio

        wake = asyncio.Event()
        self._waker = (asyncio.get_running_loop(), wake)
        while True:
            with self._cond:
                event = self._events.popleft() if self._events else None
                finished = self.done and not self._events and event is None
                if event is None:
                    wake.clear()
            if event is not None:
                yield event
            elif finished:
                return
            else:
                await wake.wait()

    def result(self, timeout: float | None = None) -> list[GenerationResult]:
        """Blocks until every sample is finished; returns them in sample order."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout=timeout):
                raise TimeoutError(f"request {self.id} not finished after {timeout}s")
            self._events.clear()
        return list(self.results)

    def cancel(self) -> None:
        """Stops the request at the next step boundary (e.g. the client went away); finish reason `cancelled`."""
        self.cancelled = True


class Sequence:
    """One sample being generated: its slot in the KV cache, its tokens so far and its detokenizer (engine-internal)."""

    __slots__ = ("handle", "index", "params", "prompt_ids", "tokens", "detok", "slot", "pos", "seed", "max_new",
                 "done")

    def __init__(self, handle, index, params, prompt_ids, detok, seed, max_new):
        self.handle, self.index, self.params, self.prompt_ids = handle, index, params, prompt_ids
        self.tokens: list[int] = []
        self.detok, self.seed, self.max_new = detok, seed, max_new
        self.slot = -1
        self.pos = len(prompt_ids)  # cache column the next fed token is written to
        self.done = False


@dataclass
class PendingRequest:
    """A validated request waiting for free slots (engine-internal)."""

    handle: RequestHandle
    prompt_ids: list[int]
    images: list[PreparedImage]
    params: SamplingParams
    max_new: int


class RequestIntake:
    """Turns `submit` arguments into a validated `PendingRequest` (or raises `ValueError` / `ContextLengthError`).

    Args:
        processor: the `GhostVisProcessor` (tokenizer, chat template, placeholder ids).
        preparer (`ImagePreparer`): validates, hashes and preprocesses images in its thread pool.
        max_seq_len (`int`), max_batch_size (`int`): the engine's context and number of slots.
    """

    def __init__(self, processor, preparer: ImagePreparer, max_seq_len: int, max_batch_size: int):
        self.processor, self.tokenizer, self.preparer = processor, processor.tokenizer, preparer
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, max_seq_len)
        self._framing, self._special_ids = framing(self.tokenizer), special_token_ids(self.tokenizer)
        p = processor
        self._run = image_placeholder_run(p.image_token_id, p.num_image_tokens, p.vision_start_token_id,
                                          p.vision_end_token_id)
        self._ids = itertools.count()

    def _expand(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for tok in ids:
            out.extend(self._run if tok == self.processor.image_marker_id else [tok])
        return out

    def check_chars(self, chars: int) -> None:
        """Raises `ContextLengthError` for a text too long to fit whatever its tokens (before tokenizing it)."""
        if chars > self.max_prompt_chars:
            raise ContextLengthError(
                f"the prompt has {chars} characters: more than the context of {self.max_seq_len} tokens can hold "
                f"(at most {self.max_prompt_chars} characters with this tokenizer)")

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt, each `<image>` expanded to its placeholder run (as the processor does)."""
        self.check_chars(len(prompt))
        return self._expand(self.tokenizer(prompt)["input_ids"])

    def encode_messages(self, messages: list[dict]) -> tuple[list[int], list]:
        """Chat messages → (prompt ids, images); the messages' texts never become control tokens (see `prompt.py`)."""
        pieces, texts, images = render_chat(self.processor, messages)
        self.check_chars(sum(map(len, pieces)) + sum(map(len, texts)))
        ids = encode_chat(self.tokenizer, pieces, texts, self._special_ids, self._framing)
        return self._expand(ids), images  # markers: only the template's are left

    def render_messages(self, messages: list[dict]) -> tuple[str, list]:
        """Chat messages (parts `{"type": "image", "image": …}` / `{"type": "text", …}`) → (prompt, images).

        The prompt is the template's text; tokenized as a string, control tokens typed in the messages act as control
        tokens: `encode_messages` keeps them text.
        """
        pieces, texts, images = render_chat(self.processor, messages)
        return "".join(p + t for p, t in zip(pieces, texts + [""])), images

    def make(self, prompt=None, images=None, messages=None, params=None, prompt_ids=None) -> PendingRequest:
        params = params or SamplingParams()
        if messages is not None:
            if prompt is not None or prompt_ids is not None or images:
                raise ValueError("pass either messages or prompt/prompt_ids/images, not both")
            prompt_ids, images = self.encode_messages(messages)
        if prompt_ids is None and not isinstance(prompt, str):
            raise ValueError("a prompt (str), prompt_ids or messages are required")
        images = list(images or [])
        ids = list(prompt_ids) if prompt_ids is not None else self.encode_prompt(prompt)
        # Count placeholders, not markers: features are scattered into exactly these positions.
        n_pad, per_image = ids.count(self.processor.image_token_id), self.processor.num_image_tokens
        if n_pad != len(images) * per_image:
            raise ValueError(f"the prompt has {n_pad / per_image:g} image markers but {len(images)} images were given")
        if not ids:
            raise ValueError("the prompt is empty")
        room = self.max_seq_len - len(ids)
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens, which leaves no room in the context of {self.max_seq_len} tokens"
            )
        max_new = params.max_new_tokens if params.max_new_tokens is not None else room
        if max_new > room:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens and {max_new} new tokens were requested, but the context holds "
                f"{self.max_seq_len} tokens: shorten the prompt or ask for at most {room} tokens"
            )
        if params.n > self.max_batch_size:
            raise ValueError(f"n={params.n} is more than the engine's max_batch_size={self.max_batch_size}")
        prepared = self.preparer.prepare(images)
        return PendingRequest(RequestHandle(next(self._ids), params.n, len(ids)), ids, prepared, params, max_new)
