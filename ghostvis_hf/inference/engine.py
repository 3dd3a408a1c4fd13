"""`GenerationEngine`: continuous batching over a slot KV cache, CUDA-graph decode steps, streaming, image caching.

One scheduler thread owns the model. Between two decode steps it admits waiting requests: their images go through
the vision cache (only misses reach the encoder), their prompts are prefilled together (left-padded, with
`transformers`' own masks and a `DynamicCache`, i.e. what `model.generate` computes) and each prompt's KV is copied
into free slots of the static `SlotKVCache`, `n` times for `n` samples. Every running sequence then advances one
token per step whatever its length; a finished sequence frees its slot for the next admission.

Decode steps feed `[B, 1]` tokens with per-row positions. On CUDA each (batch bucket, length bucket) step, together
with greedy argmax and the position updates, is one CUDA graph (optionally `torch.compile`d first), and so are the
vision encoder and single-request prefills. Steps are pipelined: step t+1 is launched before the host reads step t's
tokens (detokenizes, checks stops, streams), so host work hides behind GPU work; a sequence that finishes costs one
wasted row in the step already in flight. On the CPU everything runs eagerly with exact shapes.
"""

import logging
import secrets
import threading
import time
from collections import deque

import torch

from ..modeling_ghostvis import CACHE_KWARG
from .cuda_graphs import GraphCache
from .detokenizer import IncrementalDetokenizer, TokenTable
from .kv_cache import SlotKVCache, decode_mask, install_slot_attention
from .requests import (
    ContextLengthError, GenerationResult, PendingRequest, RequestHandle, RequestIntake, Sequence, StreamEvent,
)
from .sampling import SamplingParams, sample_tokens
from .vision_cache import ImagePreparer, PreparedImage, VisionCache

logger = logging.getLogger(__name__)

__all__ = ["ContextLengthError", "GenerationEngine", "GenerationResult", "RequestHandle", "StreamEvent"]


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


class _KVRecorder:
    """The cache a captured single-prompt prefill writes to: each layer's K/V as computed (prefill starts empty)."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class GenerationEngine:
    """Batched, streaming generation for a GhostVis model.

    Args:
        model (`GhostVisForConditionalGeneration`): in eval mode, on its device and dtype.
        processor (`GhostVisProcessor`): tokenizer, chat template and image processor.
        max_batch_size (`int`, *optional*): sequences decoded together (KV slots); 32 on CUDA, 8 on the CPU.
        max_seq_len (`int`, *optional*): context per sequence (prompt + output); defaults to
            `min(max_position_embeddings, 4096)`.
        cuda_graphs (`bool`, *optional*): run decode steps, vision encoder and single prefills as CUDA graphs;
            defaults to `True` on CUDA for unquantized models (on the CPU, `True` runs the same code uncaptured).
        compile (`bool` or `dict`, *optional*, defaults to `False`): `torch.compile` the decode step (before
            capturing it); a dict is passed as inductor `options`, e.g. `{"coordinate_descent_tuning": True}`.
        vision_cache_size (`int`, *optional*, defaults to 256): images whose features are kept (0 disables).
        preprocess_workers (`int`, *optional*, defaults to 4): threads decoding and resizing images.
        max_prefill_tokens (`int`, *optional*, defaults to 8192): padded prompt tokens prefilled together.
        batch_buckets, seq_buckets (`list[int]`, *optional*): decode shapes captured as CUDA graphs (a step runs
            in the smallest bucket that fits); default powers of two up to `max_batch_size` / from 256 up to
            `max_seq_len`. Fewer buckets mean fewer captures (and compilations).
        fused (`bool`, *optional*): decode with `FusedDecoder` (4-5 Triton kernels per layer, stacked q|k|v and
            gate|up weights) instead of the `transformers` forward; defaults to `True` on CUDA when the decoder is
            supported, Triton is installed and neither `compile` nor quantization is asked for. `True` raises a
            `ValueError` naming the reason when it cannot (off CUDA it runs in Triton's interpreter: tests only).
    """

    def __init__(self, model, processor, max_batch_size=None, max_seq_len=None, cuda_graphs=None, compile=False,
                 vision_cache_size=256, preprocess_workers=4, max_prefill_tokens=8192, batch_buckets=None,
                 seq_buckets=None, fused=None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.text_config = model.config.text_config
        self.lm = model.model.language_model
        self.lm_head = model.get_output_embeddings()
        embed = self.lm.get_input_embeddings()
        self.device, self.dtype = embed.weight.device, embed.weight.dtype
        self.vocab_size = self.lm_head.weight.shape[0]
        on_cuda = self.device.type == "cuda"
        quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None
        self.max_batch_size = max_batch_size or (32 if on_cuda else 8)
        self.max_seq_len = max_seq_len or min(getattr(self.text_config, "max_position_embeddings", 4096), 4096)
        self.compile = compile
        self.max_prefill_tokens = max_prefill_tokens
        self.batch_buckets = sorted({min(b, self.max_batch_size) for b in batch_buckets} | {self.max_batch_size}) \
            if batch_buckets else _buckets(self.max_batch_size, 1)
        self.seq_buckets = sorted({min(b, self.max_seq_len) for b in seq_buckets} | {self.max_seq_len}) \
            if seq_buckets else _buckets(self.max_seq_len, 256)
        self.prefill_buckets = _buckets(min(self.max_seq_len, 1024), 64)
        layer_types = getattr(self.text_config, "layer_types", None) or []
        self.sliding_window = getattr(self.text_config, "sliding_window", None) if "sliding_attention" in layer_types \
            else None

        install_slot_attention(self.lm)
        self.cache = SlotKVCache.for_model(self.text_config, self.max_batch_size, self.max_seq_len, self.dtype,
                                           self.device)
        self.fused = self._make_fused(fused, quantized)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in [*eos, self.tokenizer.eos_token_id] if e is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.token_table = TokenTable(self.tokenizer)
        self.vision_cache = VisionCache(vision_cache_size)
        self.preparer = ImagePreparer(processor, self.vision_cache, workers=preprocess_workers)
        self.intake = RequestIntake(processor, self.preparer, self.max_seq_len, self.max_batch_size)

        # Per-slot decode state lives on the device: a step needs no host-to-device copy.
        n, dev = self.max_batch_size, self.device
        self._rows = torch.arange(n, device=dev)
        self._tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self._positions = torch.zeros(n, dtype=torch.long, device=dev)
        self._active = torch.zeros(n, dtype=torch.long, device=dev)
        self._steps = torch.zeros(n, dtype=torch.long, device=dev)
        self._temperature, self._top_p = torch.zeros(n, device=dev), torch.ones(n, device=dev)
        self._top_k = torch.zeros(n, dtype=torch.long, device=dev)
        self._penalty = torch.ones(n, device=dev)
        self._seeds = torch.zeros(n, dtype=torch.long, device=dev)
        self._seen: torch.Tensor | None = None  # [n, V] bool, allocated for the first repetition penalty
        self._slots: list[Sequence | None] = [None] * n
        self._host = [torch.zeros(n, dtype=torch.long, pin_memory=on_cuda) for _ in range(2)]  # D2H, alternating
        self._host_i = 0
        self._pending = None  # (tokens, event, sequences) of the step in flight

        self._step_fn = self._decode_and_advance
        if compile:
            from torch import _dynamo

            # One specialisation per (batch, length) bucket; the default limit of 8 would fall back to eager.
            limit = len(self.batch_buckets) * len(self.seq_buckets) + 8
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(_dynamo.config, name):
                    setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), limit))
            options = compile if isinstance(compile, dict) else None
            self._step_fn = torch.compile(self._decode_and_advance, dynamic=False, options=options)
        # Explicit cuda_graphs=True on the CPU runs the same bucketed code paths without capture (for tests).
        graphs = bool(not quantized and (on_cuda if cuda_graphs is None else cuda_graphs))
        state = [self._tokens, self._positions, self._steps]
        self._decode_graphs = GraphCache(self._step_fn, state, "decode", on_cuda) if graphs else None
        self._vision_graphs = GraphCache(self._encode_static, (), "vision", on_cuda) if graphs else None
        self._prefill_graphs = GraphCache(self._prefill_static, (), "prefill", on_cuda) \
            if graphs and not self.sliding_window else None
        self._vision_in: torch.Tensor | None = None
        if self._prefill_graphs is not None:
            top = self.prefill_buckets[-1]
            self._pf_embeds = torch.zeros(1, top, self.text_config.hidden_size, dtype=self.dtype, device=dev)
            self._pf_positions = torch.arange(top, device=dev)[None]
            self._pf_last = torch.zeros(1, dtype=torch.long, device=dev)

        self._waiting: deque[PendingRequest] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.profile = False  # time each admission's stages (with device syncs) into `last_admission`
        self.last_admission: dict = {}
        self.stats = {"steps": 0, "prefills": 0, "images_encoded": 0}

    def _make_fused(self, fused, quantized: bool):
        """A `FusedDecoder`, or None. `fused=None` means: on CUDA where it can run, unless `compile` is asked for."""
        if fused is False or (fused is None and (self.compile or self.device.type != "cuda")):
            return None
        from .fused_decoder import FusedDecoder, unsupported_reason

        reason = "quantized weights" if quantized else unsupported_reason(self.lm)
        if reason is None:
            try:
                import triton  # noqa: F401
            except ImportError:
                reason = "Triton is not installed"
        if reason is None and self.device.type != "cuda":
            from .triton_decode import interpreting

            if not interpreting():
                reason = f"the model is on {self.device.type} (Triton kernels need CUDA, or TRITON_INTERPRET=1 for tests)"
        if reason is None and self.compile:
            reason = "compile=True (the fused step replaces torch.compile)"
        if reason is not None:
            if fused:
                raise ValueError(f"fused=True cannot be used: {reason}")
            logger.info("fused decoding off: %s", reason)
            return None
        with torch.no_grad():
            return FusedDecoder(self.lm, self.lm_head, self.cache)

    @property
    def cuda_graphs(self) -> bool:
        return self._decode_graphs is not None

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt, each `<image>` expanded to its placeholder run (as the processor does)."""
        return self.intake.encode_prompt(prompt)

    def render_messages(self, messages: list[dict]) -> tuple[str, list]:
        """Chat messages (parts `{"type": "image", "image": …}` / `{"type": "text", …}`) → (prompt, images)."""
        return self.intake.render_messages(messages)

    def submit(self, prompt=None, images=None, messages=None, params: SamplingParams | None = None,
               prompt_ids: list[int] | None = None) -> RequestHandle:
        """Queues one request; raises `ValueError` at once for a bad prompt or image, `ContextLengthError` if too long.

        Args:
            prompt (`str`, *optional*): a rendered prompt with one `<image>` marker per image.
            images (`list`, *optional*): PIL images, bytes, data URLs or paths, in marker order.
            messages (`list[dict]`, *optional*): chat messages instead of `prompt`/`images`.
            params (`SamplingParams`, *optional*)
            prompt_ids (`list[int]`, *optional*): already tokenized prompt (placeholders expanded) instead of `prompt`.
        """
        request = dict(prompt=prompt, images=images, messages=messages, prompt_ids=prompt_ids)
        return self.submit_many([request], params)[0]

    def submit_many(self, requests: list[dict], params: SamplingParams | None = None) -> list[RequestHandle]:
        """Queues several requests (dicts of `submit`'s arguments) at once, so they are prefilled together."""
        made = [self.intake.make(**{**r, "params": r.get("params") or params}) for r in requests]
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.extend(made)
            self._ensure_thread()
            self._cond.notify_all()
        return [r.handle for r in made]

    def generate(self, prompt=None, images=None, messages=None, params=None, prompt_ids=None) -> list[GenerationResult]:
        """Blocking: the `n` results of one request (arguments as for `submit`)."""
        return self.submit(prompt, images, messages, params, prompt_ids).result()

    def generate_batch(self, requests: list[dict], params=None) -> list[list[GenerationResult]]:
        """Blocking: results for several requests (dicts of `prompt`/`images`/`messages`), prefilled together."""
        return [h.result() for h in self.submit_many(requests, params)]

    def stream(self, prompt=None, images=None, messages=None, params=None):
        """Yields the text deltas of one sample as they are decoded."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() yields one sample; submit() and iterate the handle for n > 1")
        handle = self.submit(prompt, images, messages, params)
        try:
            for event in handle:
                if event.text:
                    yield event.text
        finally:
            handle.cancel()

    def close(self) -> None:
        """Stops the scheduler thread (running requests end with `cancelled`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.preparer.close()

    # ------------------------------------------------------------------ scheduler
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="ghostvis-engine", daemon=True)
            self._thread.start()

    def _running(self) -> list[Sequence]:
        return [s for s in self._slots if s is not None]

    def _take_admissible(self) -> list[PendingRequest]:
        free = sum(1 for s in self._slots if s is None)
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
                    while not (self._closed or self._waiting or any(self._slots) or self._pending):
                        self._cond.wait()
                    if self._closed:
                        break
                batch: list[PendingRequest] = []
                try:
                    # Launch step t, then read step t-1's tokens while the device computes step t.
                    launched = self._launch() if any(self._slots) else None
                    if self._pending is not None:
                        self._process(self._pending)
                    self._pending = launched
                    with self._cond:
                        batch = self._take_admissible()
                    if batch:
                        self._admit(batch)
                except Exception as e:  # keep serving: fail what was in flight, not the thread
                    logger.exception("generation step failed")
                    self._pending = None
                    for seq in self._running():
                        self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                    for req in batch:
                        if not req.handle.done:
                            self._fail(req, e)
        self._pending = None
        for seq in self._running():
            self._finish(seq, "cancelled")
        while self._waiting:
            self._fail(self._waiting.popleft(), RuntimeError("the engine was closed"))

    def _fail(self, req: PendingRequest, error: Exception) -> None:
        for i in range(req.params.n):
            if req.handle.results[i] is None:
                msg = f"{type(error).__name__}: {error}"
                result = GenerationResult(i, "", [], "error", len(req.prompt_ids), error=msg)
                req.handle._push(StreamEvent(i, "", None, "error"), result)

    def _mark(self, key: str, t0: float) -> None:
        if self.profile:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.last_admission[key] = time.perf_counter() - t0

    # ------------------------------------------------------------------ images and prefill
    def _encode_static(self, n: int) -> torch.Tensor:
        return self.model.model.get_image_features(self._vision_in[:n])  # [n, N, d_text]

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._vision_graphs is not None:
            try:
                if self._vision_in is None:
                    self._vision_in = torch.zeros((16, *pixels.shape[1:]), dtype=self.model.model.vision_tower.dtype,
                                                  device=self.device)
                k = pixels.shape[0]
                self._vision_in[:k].copy_(pixels)
                return self._vision_graphs(self._bucket([1, 2, 4, 8, 16], k))[:k]
            except Exception:
                logger.warning("vision encoder CUDA graph failed; encoding eagerly from now on", exc_info=True)
                self._vision_graphs = None
        return self.model.model.get_image_features(pixels.to(self.device))

    def _image_features(self, requests: list[PendingRequest]) -> None:
        """Fills `features` of every prepared image, encoding the cache misses in chunks of 16."""
        todo: dict[str, list[PreparedImage]] = {}
        for req in requests:
            for im in req.images:
                if im.features is None:
                    cached = self.vision_cache.get(im.key, count=False)  # encoded by another request meanwhile?
                    if cached is not None:
                        im.features = cached
                    else:
                        todo.setdefault(im.key, []).append(im)
        keys = list(todo)
        for start in range(0, len(keys), 16):
            chunk = keys[start : start + 16]
            features = self._encode(torch.stack([todo[k][0].pixel_values for k in chunk]).to(self.device))
            self.stats["images_encoded"] += len(chunk)
            for k, feat in zip(chunk, features):
                feat = feat.to(self.dtype).clone()  # [N, d_text]; a graph's output buffer is reused
                self.vision_cache.put(k, feat)
                for im in todo[k]:
                    im.features, im.pixel_values = feat, None

    def _prefill_static(self, length: int):
        recorder = _KVRecorder()
        # Right-padded single prompt: causal attention keeps the padding out of the real positions.
        out = self.lm(inputs_embeds=self._pf_embeds[:, :length], position_ids=self._pf_positions[:, :length],
                      attention_mask={"full_attention": None}, use_cache=True, **{CACHE_KWARG: recorder})
        logits = self.lm_head(out.last_hidden_state.index_select(1, self._pf_last)[:, 0])  # [1, V]
        layers = range(self.text_config.num_hidden_layers)
        return logits, [recorder.keys[i] for i in layers], [recorder.values[i] for i in layers]

    def _prefill(self, requests: list[PendingRequest]):
        """Prefills the prompts; returns last-position logits `[k, V]`, per-layer K/V `[k, H, T, D]`, start columns."""
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, req in enumerate(requests):  # left padding, as `generate` batches prompts
            ids[i, width - len(req.prompt_ids) :] = torch.tensor(req.prompt_ids)
            mask[i, width - len(req.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.lm.get_input_embeddings()(ids)  # [k, T, d_text]
        feats = [im.features for req in requests for im in req.images]
        if feats:
            placeholders = (ids == self.processor.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(placeholders, torch.cat(feats).to(embeds.dtype))  # [k, T, d_text]
        self.stats["prefills"] += 1
        starts = [width - len(r.prompt_ids) for r in requests]
        if self._prefill_graphs is not None and len(requests) == 1 and width <= self.prefill_buckets[-1]:
            try:
                self._pf_embeds[:, :width] = embeds
                self._pf_last.fill_(width - 1)
                logits, keys, values = self._prefill_graphs(self._bucket(self.prefill_buckets, width))
                return logits.float(), keys, values, starts
            except Exception:
                logger.warning("prefill CUDA graph failed; prefilling eagerly from now on", exc_info=True)
                self._prefill_graphs = None
        from transformers import DynamicCache

        cache = DynamicCache(config=self.text_config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                      **{CACHE_KWARG: cache})
        logits = self.lm_head(out.last_hidden_state[:, -1]).float()  # [k, V]
        layers = [cache.layers[i] for i in range(self.text_config.num_hidden_layers)]  # transformers >= 4.56 API
        return logits, [layer.keys for layer in layers], [layer.values for layer in layers], starts

    def _admit(self, requests: list[PendingRequest]) -> None:
        t0 = time.perf_counter()
        self.last_admission = {}
        self._image_features(requests)
        self._mark("images_s", t0)
        logits, keys, values, starts = self._prefill(requests)
        self._mark("prefill_s", t0)
        seqs, rows = [], []
        free = iter([s for s, seq in enumerate(self._slots) if seq is None])
        for i, req in enumerate(requests):
            for j in range(req.params.n):
                seed = (req.params.seed + j) if req.params.seed is not None else secrets.randbits(62)
                seq = Sequence(req.handle, j, req.params, req.prompt_ids,
                               IncrementalDetokenizer(self.token_table, req.params.stop), seed, req.max_new)
                seq.slot = next(free)
                self._slots[seq.slot] = seq
                seqs.append(seq)
                rows.append(i)
        dev = self.device
        slots, rows_t = torch.tensor([s.slot for s in seqs], device=dev), torch.tensor(rows, device=dev)
        self.cache.write_prefill(slots, rows_t, torch.tensor([starts[i] for i in rows], device=dev), keys, values)
        self._set_slot_params(seqs, slots)
        first = self._sample(logits[rows_t], slots, seqs)
        self._tokens[slots] = first
        self._positions[slots] = torch.tensor([s.pos for s in seqs], device=dev)
        self._active[slots] = 1
        for seq, tok in zip(seqs, first.tolist()):
            self._append(seq, tok)
        self._mark("total_s", t0)

    def _set_slot_params(self, seqs: list[Sequence], slots: torch.Tensor) -> None:
        def put(buffer, values):
            buffer[slots] = torch.tensor(values, dtype=buffer.dtype).to(self.device)

        put(self._temperature, [0.0 if s.params.greedy else s.params.temperature for s in seqs])
        put(self._top_p, [s.params.top_p for s in seqs])
        put(self._top_k, [s.params.top_k for s in seqs])
        put(self._penalty, [s.params.repetition_penalty for s in seqs])
        put(self._seeds, [s.seed for s in seqs])
        self._steps[slots] = 0
        for seq in seqs:
            if seq.params.repetition_penalty != 1.0:
                if self._seen is None:
                    self._seen = torch.zeros(self.max_batch_size, self.vocab_size, dtype=torch.bool, device=self.device)
                self._seen[seq.slot] = False
                self._seen[seq.slot, torch.tensor(seq.prompt_ids, device=self.device)] = True

    def _sample(self, logits: torch.Tensor, slots: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Next token for each row of `logits` (rows belong to `slots`); updates the repetition-penalty state."""
        penalised = self._seen is not None and any(s.params.repetition_penalty != 1.0 for s in seqs)
        if all(s.params.greedy for s in seqs) and not penalised:
            return logits.argmax(dim=-1)
        tokens = sample_tokens(
            logits.float(), self._temperature[slots], self._top_k[slots], self._top_p[slots], self._seeds[slots],
            self._steps[slots], penalty=self._penalty[slots] if penalised else None,
            seen=self._seen[slots] if penalised else None,
        )
        if penalised:
            self._seen[slots, tokens] = True
        return tokens

    # ------------------------------------------------------------------ decode
    def _decode_forward(self, batch: int, length: int) -> torch.Tensor:
        positions = self._positions[:batch]
        if self.fused is not None:  # reads each row's cache up to its own position: `length` is not needed
            return self.fused(self._tokens[:batch], positions)
        self.cache.begin_step(self._rows[:batch], positions, batch, length)
        masks = {"full_attention": decode_mask(positions, length)}
        if self.sliding_window:
            masks["sliding_attention"] = decode_mask(positions, length, self.sliding_window)
        out = self.lm(input_ids=self._tokens[:batch, None], attention_mask=masks, position_ids=positions[:, None],
                      use_cache=True, ghostvis_decode=True, **{CACHE_KWARG: self.cache})
        return self.lm_head(out.last_hidden_state[:, -1])  # [B, V]

    def _decode_and_advance(self, batch: int, length: int) -> torch.Tensor:
        """One decode step plus greedy picks and position updates, so a graph covers the whole greedy step."""
        logits = self._decode_forward(batch, length)
        self._tokens[:batch] = logits.argmax(dim=-1)
        self._positions[:batch] += self._active[:batch]
        self._steps[:batch] += self._active[:batch]
        return logits

    def warmup(self, batch_sizes=None, seq_lens=None) -> None:
        """Captures (and compiles) the decode graphs for these buckets now instead of at first use."""
        if not self.cuda_graphs or not self._decode_graphs.capture:
            return
        with torch.no_grad():
            for b in batch_sizes or self.batch_buckets:
                for n in [self.max_seq_len] if self.fused is not None else seq_lens or self.seq_buckets:
                    key = (self._bucket(self.batch_buckets, b), self._bucket(self.seq_buckets, n))
                    if key not in self._decode_graphs:
                        self._decode_graphs.graphs[key] = self._decode_graphs._capture(key)

    @staticmethod
    def _bucket(buckets: list[int], need: int) -> int:
        return next(b for b in buckets if b >= need)

    def _launch(self):
        """Queues one decode step for every running sequence; returns what `_process` needs to read its tokens."""
        for seq in self._running():
            if seq.handle.cancelled or seq.pos >= self.max_seq_len:
                self._finish(seq, "cancelled" if seq.handle.cancelled else "length")
        running = self._running()
        if not running:
            return None
        top, need = max(s.slot for s in running) + 1, max(s.pos for s in running) + 1
        if self.fused is not None:  # fused attention stops at each row's position: one graph per batch bucket
            batch, length = (self._bucket(self.batch_buckets, top) if self.cuda_graphs else top), self.max_seq_len
        elif self.cuda_graphs or self.compile:  # bucketed shapes: one graph / compilation each
            batch, length = self._bucket(self.batch_buckets, top), self._bucket(self.seq_buckets, need)
        else:
            batch, length = top, min(self.max_seq_len, -(-need // 16) * 16)
        logits = self._decode_graphs(batch, length) if self.cuda_graphs else self._step_fn(batch, length)
        if not all(s.params.greedy and s.params.repetition_penalty == 1.0 for s in running):
            self._tokens[:batch] = self._sample(logits, self._rows[:batch], running)  # idle rows: never read
        for seq in running:
            seq.pos += 1
        self.stats["steps"] += 1
        if self.device.type != "cuda":
            return self._tokens[:batch].tolist(), None, running
        host, self._host_i = self._host[self._host_i], self._host_i ^ 1
        host[:batch].copy_(self._tokens[:batch], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event, running

    def _process(self, pending) -> None:
        tokens, event, running = pending
        if event is not None:
            event.synchronize()
            tokens = tokens.tolist()
        for seq in running:
            if not seq.done:  # finished while this step was in flight: its row is discarded
                self._append(seq, tokens[seq.slot])

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

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: str | None = None) -> None:
        seq.done = True
        text += seq.detok.flush()
        result = GenerationResult(seq.index, seq.detok.text, list(seq.tokens), reason, len(seq.prompt_ids), error)
        self._slots[seq.slot] = None
        self._active[seq.slot] = 0
        self._positions[seq.slot] = 0
        seq.handle._push(StreamEvent(seq.index, text, seq.tokens[-1] if seq.tokens else None, reason), result)
