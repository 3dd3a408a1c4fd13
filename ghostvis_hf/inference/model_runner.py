"""`ModelRunner`: the device side of `GenerationEngine`: every tensor, kernel and CUDA graph, no request bookkeeping.

Admission goes through three calls: `image_features` (only vision-cache misses reach the encoder), `prefill` (the
prompts together, left-padded, with `transformers`' own masks and a `DynamicCache`, i.e. what `model.generate`
computes) and `start`, which copies each prompt's KV into its slots of the static `SlotKVCache` and picks the first
tokens. `step` then advances every running slot one token: `[B, 1]` tokens with per-row positions. Per-slot state
(tokens, positions, sampling parameters, repetition-penalty masks) lives on the device, so a step needs no
host-to-device copy.

On CUDA each (batch bucket, length bucket) step, together with greedy argmax and the position updates, is one CUDA
graph (optionally `torch.compile`d first, or the `FusedDecoder`'s Triton kernels), and so are the vision encoder and
single-request prefills. On the CPU everything runs eagerly with exact shapes.
"""

import logging

import torch

from ..modeling_ghostvis import CACHE_KWARG
from ..quantization import quantization_kind
from .cuda_graphs import GraphCache
from .kv_cache import SlotKVCache, decode_mask, install_slot_attention
from .requests import PendingRequest, Sequence
from .sampling import sample_tokens
from .vision_cache import PreparedImage, VisionCache

logger = logging.getLogger(__name__)


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket(buckets: list[int], need: int) -> int:
    """The smallest of the (sorted) `buckets` that holds `need`."""
    return next(b for b in buckets if b >= need)


class _KVRecorder:
    """The cache a captured single-prompt prefill writes to: each layer's K/V as computed (prefill starts empty)."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class ModelRunner:
    """The model's device work for `GenerationEngine`, which documents the arguments.

    Args:
        model (`GhostVisForConditionalGeneration`): in eval mode, on its device and dtype.
        image_token_id (`int`): the placeholder id image features are scattered into.
        pad_id (`int`): the id left padding uses in batched prefills.
        vision_cache (`VisionCache`): features of images seen before.
        max_batch_size, max_seq_len, cuda_graphs, compile, batch_buckets, seq_buckets, fused: as for
            `GenerationEngine`.
    """

    def __init__(self, model, image_token_id: int, pad_id: int, vision_cache: VisionCache, max_batch_size=None,
                 max_seq_len=None, cuda_graphs=None, compile=False, batch_buckets=None, seq_buckets=None,
                 fused=None):
        self.model = model
        self.image_token_id, self.pad_id, self.vision_cache = image_token_id, pad_id, vision_cache
        self.text_config = model.config.text_config
        self.lm = model.model.language_model
        self.lm_head = model.get_output_embeddings()
        embed = self.lm.get_input_embeddings()
        self.device, self.dtype = embed.weight.device, embed.weight.dtype
        self.vocab_size = self.lm_head.weight.shape[0]
        on_cuda = self.device.type == "cuda"
        # int8 weight-only (torchao) runs plain torch ops in `transformers`' forward and the fused kernels read it:
        # graphs and the fused step as unquantized; other quantizations (bitsandbytes) decode eagerly.
        quantized = quantization_kind(model) not in (None, "int8")
        self.max_batch_size = max_batch_size or (32 if on_cuda else 8)
        self.max_seq_len = max_seq_len or min(getattr(self.text_config, "max_position_embeddings", 4096), 4096)
        self.compile = compile
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
        self.stats = {"steps": 0, "prefills": 0, "images_encoded": 0}
        self._init_slot_state()
        # Explicit cuda_graphs=True on the CPU runs the same bucketed code paths without capture (for tests).
        self._init_graphs(bool(not quantized and (on_cuda if cuda_graphs is None else cuda_graphs)))

    def _init_slot_state(self) -> None:
        """Per-slot decode state lives on the device: a step needs no host-to-device copy."""
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
        on_cuda = dev.type == "cuda"
        self._host = [torch.zeros(n, dtype=torch.long, pin_memory=on_cuda) for _ in range(2)]  # D2H, alternating
        self._host_i = 0

    def _init_graphs(self, graphs: bool) -> None:
        on_cuda = self.device.type == "cuda"
        self._step_fn = self._decode_and_advance
        if self.compile:
            from torch import _dynamo

            # One specialisation per (batch, length) bucket; the default limit of 8 would fall back to eager.
            limit = len(self.batch_buckets) * len(self.seq_buckets) + 8
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(_dynamo.config, name):
                    setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), limit))
            options = self.compile if isinstance(self.compile, dict) else None
            self._step_fn = torch.compile(self._decode_and_advance, dynamic=False, options=options)
        state = [self._tokens, self._positions, self._steps]
        self.decode_graphs = GraphCache(self._step_fn, state, "decode", on_cuda) if graphs else None
        self._vision_graphs = GraphCache(self._encode_static, (), "vision", on_cuda) if graphs else None
        self._prefill_graphs = GraphCache(self._prefill_static, (), "prefill", on_cuda) \
            if graphs and not self.sliding_window else None
        self._vision_in: torch.Tensor | None = None
        if self._prefill_graphs is not None:
            top, dev = self.prefill_buckets[-1], self.device
            self._pf_embeds = torch.zeros(1, top, self.text_config.hidden_size, dtype=self.dtype, device=dev)
            self._pf_positions = torch.arange(top, device=dev)[None]
            self._pf_last = torch.zeros(1, dtype=torch.long, device=dev)

    def _make_fused(self, fused, quantized: bool):
        """A `FusedDecoder`, or None. `fused=None` means: on CUDA where it can run, unless `compile` is asked for."""
        if fused is False or (fused is None and (self.compile or self.device.type != "cuda")):
            return None
        from .fused_decoder import FusedDecoder, unsupported_reason

        reason = f"{quantization_kind(self.model)} quantized weights (the kernels read --quantize int8 only)" \
            if quantized else unsupported_reason(self.lm)
        if reason is None:
            try:
                import triton  # noqa: F401
            except ImportError:
                reason = "Triton is not installed"
        if reason is None and self.device.type != "cuda":
            from .triton_decode import interpreting

            if not interpreting():
                reason = (f"the model is on {self.device.type} "
                          "(Triton kernels need CUDA, or TRITON_INTERPRET=1 for tests)")
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
        return self.decode_graphs is not None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ images and prefill
    def _encode_static(self, n: int) -> torch.Tensor:
        return self.model.model.get_image_features(self._vision_in[:n], return_dict=True).pooler_output  # [n, N, d_text]

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._vision_graphs is not None:
            try:
                if self._vision_in is None:
                    self._vision_in = torch.zeros((16, *pixels.shape[1:]), dtype=self.model.model.vision_tower.dtype,
                                                  device=self.device)
                k = pixels.shape[0]
                self._vision_in[:k].copy_(pixels)
                return self._vision_graphs(bucket([1, 2, 4, 8, 16], k))[:k]
            except Exception:
                logger.warning("vision encoder CUDA graph failed; encoding eagerly from now on", exc_info=True)
                self._vision_graphs = None
        return self.model.model.get_image_features(pixels.to(self.device), return_dict=True).pooler_output

    def image_features(self, requests: list[PendingRequest]) -> None:
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

    def prefill(self, requests: list[PendingRequest]):
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
            placeholders = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(placeholders, torch.cat(feats).to(embeds.dtype))  # [k, T, d_text]
        self.stats["prefills"] += 1
        starts = [width - len(r.prompt_ids) for r in requests]
        if self._prefill_graphs is not None and len(requests) == 1 and width <= self.prefill_buckets[-1]:
            try:
                self._pf_embeds[:, :width] = embeds
                self._pf_last.fill_(width - 1)
                logits, keys, values = self._prefill_graphs(bucket(self.prefill_buckets, width))
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

    def start(self, seqs: list[Sequence], rows: list[int], starts: list[int], logits, keys, values) -> list[int]:
        """Puts prefilled prompts into their sequences' slots and picks the first tokens.

        Args:
            seqs (`list[Sequence]`): the new sequences, each with its `slot` assigned.
            rows (`list[int]`): for each sequence, its prompt's row in `prefill`'s outputs (`n` samples share one).
            starts, logits, keys, values: what `prefill` returned.
        """
        dev = self.device
        slots, rows_t = torch.tensor([s.slot for s in seqs], device=dev), torch.tensor(rows, device=dev)
        self.cache.write_prefill(slots, rows_t, torch.tensor([starts[i] for i in rows], device=dev), keys, values)
        self._set_slot_params(seqs, slots)
        first = self._sample(logits[rows_t], slots, seqs)
        self._tokens[slots] = first
        self._positions[slots] = torch.tensor([s.pos for s in seqs], device=dev)
        self._active[slots] = 1
        return first.tolist()

    def free(self, slot: int) -> None:
        """Parks a finished sequence's slot: later steps compute its row but do not advance it."""
        self._active[slot] = 0
        self._positions[slot] = 0

    def _set_slot_params(self, seqs: list[Sequence], slots: torch.Tensor) -> None:
        def put(buffer, values):
            buffer[slots] = torch.tensor(values, dtype=buffer.dtype).to(self.device)

        put(self._temperature, [0.0 if s.params.greedy else s.params.temperature for s in seqs])
        put(self._top_p, [s.params.top_p for s in seqs])
        put(self._top_k, [min(s.params.top_k, self.vocab_size) for s in seqs])  # k >= V keeps all
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
        if not self.cuda_graphs or not self.decode_graphs.capture:
            return
        with torch.no_grad():
            for b in batch_sizes or self.batch_buckets:
                for n in [self.max_seq_len] if self.fused is not None else seq_lens or self.seq_buckets:
                    key = (bucket(self.batch_buckets, b), bucket(self.seq_buckets, n))
                    if key not in self.decode_graphs:
                        self.decode_graphs.graphs[key] = self.decode_graphs._capture(key)

    def _step_shape(self, top: int, need: int) -> tuple[int, int]:
        """(batch, length) a step over slots `[0, top)` with contexts up to `need` tokens runs at."""
        if self.fused is not None:  # fused attention stops at each row's position: one graph per batch bucket
            return (bucket(self.batch_buckets, top) if self.cuda_graphs else top), self.max_seq_len
        if self.cuda_graphs or self.compile:  # bucketed shapes: one graph / compilation each
            return bucket(self.batch_buckets, top), bucket(self.seq_buckets, need)
        return top, min(self.max_seq_len, -(-need // 16) * 16)

    def step(self, running: list[Sequence]):
        """Queues one decode step for the `running` sequences (their `pos` not yet advanced).

        Returns `(tokens, event)` for `read`: on CUDA a pinned host buffer the step's tokens are being copied into
        and the event that marks the copy done, so the caller can do host work while the device computes.
        """
        top, need = max(s.slot for s in running) + 1, max(s.pos for s in running) + 1
        batch, length = self._step_shape(top, need)
        logits = self.decode_graphs(batch, length) if self.cuda_graphs else self._step_fn(batch, length)
        if not all(s.params.greedy and s.params.repetition_penalty == 1.0 for s in running):
            self._tokens[:batch] = self._sample(logits, self._rows[:batch], running)  # idle rows: never read
        self.stats["steps"] += 1
        if self.device.type != "cuda":
            return self._tokens[:batch].tolist(), None
        host, self._host_i = self._host[self._host_i], self._host_i ^ 1
        host[:batch].copy_(self._tokens[:batch], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def read(tokens, event) -> list[int]:
        """The token of every row of a step `step` returned (waits for its copy to the host)."""
        if event is not None:
            event.synchronize()
            tokens = tokens.tolist()
        return tokens
