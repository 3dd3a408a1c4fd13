"""`Scheduler`: the one thread that drives the `ModelRunner`: the waiting queue, admission, the step loop, streaming.

Between two decode steps it admits waiting requests while their samples fit in the free slots and their padded
prompts in `max_prefill_tokens`: they are prefilled together and each becomes `n` sequences. Every running sequence
then advances one token per step whatever its length; a finished sequence frees its slot for the next admission.

Steps are pipelined: step t+1 is launched before the host reads step t's tokens (detokenizes, checks stops, streams),
so host work hides behind device work; a sequence that finishes costs one wasted row in the step already in flight.
A failing step fails what was in flight, never the thread; a request that fails its admission (or its host-side
work) fails alone.
"""

import logging
import secrets
import threading
import time
from collections import deque

import torch

from .detokenizer import IncrementalDetokenizer, TokenTable
from .model_runner import ModelRunner
from .requests import GenerationResult, PendingRequest, Sequence, StreamEvent
from .sampling import wrap_int64

logger = logging.getLogger(__name__)


class Scheduler:
    """Queues validated requests and runs them to completion on a background thread.

    Args:
        runner (`ModelRunner`): does every piece of device work.
        eos_ids (`set[int]`): tokens that end a sample (unless its `ignore_eos`).
        token_table (`TokenTable`): the tokenizer's pieces, for incremental detokenization.
        max_prefill_tokens (`int`): padded prompt tokens prefilled together.
    """

    def __init__(self, runner: ModelRunner, eos_ids: set[int], token_table: TokenTable, max_prefill_tokens: int):
        self.runner, self.eos_ids, self.token_table = runner, eos_ids, token_table
        self.max_prefill_tokens = max_prefill_tokens
        self.max_seq_len = runner.max_seq_len
        self.slots: list[Sequence | None] = [None] * runner.max_batch_size
        self.profile = False  # time each admission's stages (with device syncs) into `last_admission`
        self.last_admission: dict = {}
        self._waiting: deque[PendingRequest] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pending = None  # (tokens, event, sequences) of the step in flight

    def add(self, requests: list[PendingRequest]) -> None:
        """Queues requests (admitted in order) and wakes the thread, starting it if needed."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.extend(requests)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="ghostvis-engine", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def close(self) -> None:
        """Stops the thread: running sequences end with `cancelled`, waiting requests with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the loop
    def _running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def _take_admissible(self) -> list[PendingRequest]:
        if any(r.handle.cancelled for r in self._waiting):  # abandoned before admission: never prefill them
            for req in [r for r in self._waiting if r.handle.cancelled]:
                self._end_waiting(req, "cancelled")
            self._waiting = deque(r for r in self._waiting if not r.handle.cancelled)
        free = sum(1 for s in self.slots if s is None)
        batch: list[PendingRequest] = []
        while self._waiting and self._waiting[0].params.n <= free:
            req = self._waiting[0]
            longest = max([len(req.prompt_ids)] + [len(r.prompt_ids) for r in batch])
            if batch and longest * (len(batch) + 1) > self.max_prefill_tokens:
                break
            batch.append(self._waiting.popleft())
            free -= req.params.n
        return batch

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not (self._closed or self._waiting or any(self.slots) or self._pending):
                        self._cond.wait()
                    if self._closed:
                        break
                self._step()
                with self._cond:
                    batch = self._take_admissible()
                if batch:
                    self._admit_isolated(batch)
        self._pending = None
        for seq in self._running():
            self._finish(seq, "cancelled")
        while self._waiting:
            self._end_waiting(self._waiting.popleft(), "error", RuntimeError("the engine was closed"))

    def _step(self) -> None:
        """Launches step t, then reads step t-1's tokens while the device computes step t."""
        try:
            launched = self._launch() if any(self.slots) else None
            if self._pending is not None:
                self._process(self._pending)
            self._pending = launched
        except Exception as e:  # keep serving: fail what was in flight, not the thread
            logger.exception("generation step failed")
            self._pending = None
            for seq in self._running():
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}", flush=False)

    def _admit_isolated(self, batch: list[PendingRequest]) -> None:
        """Admits `batch`; if that fails, each request alone, so a bad request fails itself and nothing else."""
        try:
            self._admit(batch)
            return
        except Exception as e:
            if len(batch) == 1:
                logger.exception("admitting request %d failed", batch[0].handle.id)
                self._end_waiting(batch[0], "error", e)
                return
        for req in batch:
            self._admit_isolated([req])

    def _end_waiting(self, req: PendingRequest, reason: str, error: Exception | None = None) -> None:
        """Ends a request that holds no slot (never admitted, or its admission failed)."""
        msg = f"{type(error).__name__}: {error}" if error is not None else None
        for i in range(req.params.n):
            if req.handle.results[i] is None:
                result = GenerationResult(i, "", [], reason, len(req.prompt_ids), error=msg)
                req.handle._push(StreamEvent(i, "", None, reason), result)

    def _mark(self, key: str, t0: float) -> None:
        if self.profile:
            self.runner.synchronize()
            self.last_admission[key] = time.perf_counter() - t0

    # ------------------------------------------------------------------ admission and steps
    def _admit(self, requests: list[PendingRequest]) -> None:
        t0 = time.perf_counter()
        self.last_admission = {}
        seqs, rows = [], []
        try:  # everything up to the first tokens is undone on failure: the caller retries request by request
            self.runner.image_features(requests)
            self._mark("images_s", t0)
            logits, keys, values, starts = self.runner.prefill(requests)
            self._mark("prefill_s", t0)
            free = iter([s for s, seq in enumerate(self.slots) if seq is None])
            for i, req in enumerate(requests):
                for j in range(req.params.n):
                    # NOTE: seeds wrap to int64 here, where they become tensor values (a seed of 2**63 used to
                    # overflow in this thread and fail every running request).
                    seed = wrap_int64(req.params.seed + j) if req.params.seed is not None else secrets.randbits(62)
                    seq = Sequence(req.handle, j, req.params, req.prompt_ids,
                                   IncrementalDetokenizer(self.token_table, req.params.stop), seed, req.max_new)
                    seq.slot = next(free)
                    self.slots[seq.slot] = seq
                    seqs.append(seq)
                    rows.append(i)
            first = self.runner.start(seqs, rows, starts, logits, keys, values)
        except BaseException:
            for seq in seqs:
                self.slots[seq.slot] = None
                self.runner.free(seq.slot)
            raise
        for seq, tok in zip(seqs, first):
            self._append_guarded(seq, tok)
        self._mark("total_s", t0)

    def _launch(self):
        """Queues one decode step for every running sequence; returns what `_process` needs to read its tokens."""
        for seq in self._running():
            if seq.handle.cancelled or seq.pos >= self.max_seq_len:
                self._finish(seq, "cancelled" if seq.handle.cancelled else "length")
        running = self._running()
        if not running:
            return None
        tokens, event = self.runner.step(running)
        for seq in running:
            seq.pos += 1
        return tokens, event, running

    def _process(self, pending) -> None:
        tokens, event, running = pending
        tokens = self.runner.read(tokens, event)
        for seq in running:
            if not seq.done:  # finished while this step was in flight: its row is discarded
                self._append_guarded(seq, tokens[seq.slot])

    def _append_guarded(self, seq: Sequence, token: int) -> None:
        """`_append`, failing only this sequence if its host-side work (detokenizing, stop strings) raises."""
        try:
            self._append(seq, token)
        except Exception as e:
            logger.exception("request %d failed", seq.handle.id)
            if not seq.done:
                self._finish(seq, "error", error=f"{type(e).__name__}: {e}", flush=False)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.tokens.append(token)
        if seq.handle.first_token_at is None:
            seq.handle.first_token_at = time.perf_counter()
        finish = None
        if token in self.eos_ids and not seq.params.ignore_eos:
            text, finish = "", "stop"
        else:
            text = seq.detok.push(token)
            if seq.detok.stopped:
                finish = "stop"
        if finish is None and len(seq.tokens) >= seq.max_new:
            finish = "length"
        if finish is None:
            if text:
                seq.handle._push(StreamEvent(seq.index, text, token))
            return
        self._finish(seq, finish, text)

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: str | None = None,
                flush: bool = True) -> None:
        seq.done = True
        text += seq.detok.flush() if flush else ""
        result = GenerationResult(seq.index, seq.detok.text, list(seq.tokens), reason, len(seq.prompt_ids), error)
        self.slots[seq.slot] = None
        self.runner.free(seq.slot)
        seq.handle._push(StreamEvent(seq.index, text, seq.tokens[-1] if seq.tokens else None, reason), result)
