"""The recipes' speed log (issue 16): tokens/s, conversations/s, MFU and peak memory at every logging step.

- Tokens are counted on the host, from the collated batch while it is still on the CPU (in the DataLoader worker
  when there are workers): the non-padding tokens, the sum of squared sequence lengths (attention FLOPs) and the
  images ride along in the batch under `STATS_KEY` and are taken out before the model sees it. Nothing syncs with
  the GPU per step; the counts of all ranks are summed once per logging step.
- MFU uses `ghostvis bench train`'s FLOP formula (`bench.train_scenarios.flop_coefficients`: text matmuls + LM head,
  attention, vision tower + glue) and its peak FLOP/s per GPU; on the CPU, or a GPU it does not know, MFU is `None`,
  as is peak memory off CUDA. Like the benchmark it counts 6 N FLOPs per token also for frozen towers and LoRA.
- Time is wall-clock between logging steps; the Trainer reads the loss (a sync) just before each log, so an interval
  covers the GPU work of its steps. The first interval includes start-up and is left out of `summary()`.

`class GhostVisSFTTrainer(ThroughputMixin, TokenBudgetMixin, SFTTrainer)` installs it;
`throughput_summary(trainer)` is what a recipe writes to its run summary.
"""

import dataclasses
import json
import logging
import os
import time

import torch
from transformers.trainer_callback import TrainerCallback

logger = logging.getLogger("ghostvis")

STATS_KEY = "ghostvis_batch_stats"
THROUGHPUT_FILE = "throughput.json"  # the running speed summary in the output folder
_FIELDS = ("tokens", "tokens_sq", "conversations", "images")


def batch_stats(batch: dict, pad_token_id: int | None) -> dict:
    """Non-padding tokens, sum of squared sequence lengths, conversations and images of a collated CPU batch.

    Padded batches count `attention_mask` per row; packed batches (`cu_seq_lens_q`, no mask) count their segments,
    leaving out the padding segments (all `pad_token_id`).

    Example:
    ```python
    >>> import torch
    >>> batch_stats({"input_ids": torch.tensor([[5, 6, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}, 0)
    {'tokens': 3, 'tokens_sq': 9, 'conversations': 1, 'images': 0}

    ```
    """
    ids = batch["input_ids"]
    if batch.get("attention_mask") is not None:
        lens = batch["attention_mask"].sum(-1).flatten().long()
    elif batch.get("cu_seq_lens_q") is not None:
        cu = batch["cu_seq_lens_q"].long()
        segs = cu[1:] - cu[:-1]
        seg_id = torch.repeat_interleave(torch.arange(len(segs)), segs)
        not_pad = ids.flatten() != pad_token_id if pad_token_id is not None else torch.ones(ids.numel(), dtype=bool)
        real = torch.zeros(len(segs), dtype=torch.long).index_add_(0, seg_id, not_pad.long()) > 0
        lens = segs[real]
    else:
        lens = torch.full((ids.shape[0],), ids.shape[-1], dtype=torch.long)
    pixels = batch.get("pixel_values")
    return {"tokens": int(lens.sum()), "tokens_sq": int((lens * lens).sum()), "conversations": int((lens > 0).sum()),
            "images": int(pixels.shape[0]) if torch.is_tensor(pixels) else 0}


class CountingCollator:
    """Wraps a data collator: adds `batch_stats` of every batch under `STATS_KEY` (other attributes pass through)."""

    def __init__(self, inner, pad_token_id: int | None):
        self.inner, self.pad_token_id = inner, pad_token_id

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):  # also while unpickling in a DataLoader worker
            raise AttributeError(name)
        return getattr(inner, name)

    def __call__(self, examples):
        batch = self.inner(examples)
        batch[STATS_KEY] = batch_stats(batch, self.pad_token_id)
        return batch


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second`, `conversations_per_second`, `mfu` and `peak_memory_gib` to every training log.

    Args:
        flop_coefficients (`dict`, *optional*): `bench.train_scenarios.flop_coefficients` of the model; by default
            computed from the model at `on_train_begin` (`None` if it is not a GhostVis/LLaVA-like model).
        peak_flops (`float`, *optional*): peak FLOP/s of one device; by default `bench.train.PEAK_FLOPS` by GPU name.

    Values go into the `logs` (so the console and the reporting integrations after this callback show them) and
    into `state.log_history`; the main process also rewrites `<output_dir>/throughput.json` (`summary()` so far) at
    every log, so a run that dies later (or is stopped) still has its speed on disk. `ThroughputMixin` puts it first
    in the callback list.
    """

    def __init__(self, flop_coefficients: dict | None = None, peak_flops: float | None = None):
        self.flop_coefficients, self.peak_flops = flop_coefficients, peak_flops
        self.counts = dict.fromkeys(_FIELDS, 0)
        self.intervals: list[dict] = []
        self._last = time.perf_counter()

    def add(self, stats: dict | None) -> None:
        """Counts one batch (`batch_stats`); called by the trainer on the host, before the batch's forward."""
        if stats:
            for k in _FIELDS:
                self.counts[k] += stats[k]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.flop_coefficients is None and model is not None:
            self.flop_coefficients = model_flop_coefficients(model)
        if self.peak_flops is None:
            self.peak_flops = device_peak_flops(args.device)
        if torch.cuda.is_available() and args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        self.counts, self.intervals = dict.fromkeys(_FIELDS, 0), []
        self._last = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # training logs only (not eval, not the final summary)
            return
        now = time.perf_counter()
        counts = _sum_over_ranks(self.counts, args)
        interval = {"seconds": now - self._last, **counts, "flops": self._flops(counts)}
        self.counts, self._last = dict.fromkeys(_FIELDS, 0), now
        self.intervals.append(interval)
        metrics = self._rates([interval], args.world_size)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        if args.output_dir and state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            path = os.path.join(args.output_dir, THROUGHPUT_FILE)
            with open(path + ".tmp", "w") as f:
                json.dump({**self.summary(args.world_size), "step": state.global_step}, f, indent=2)
            os.replace(path + ".tmp", path)  # never a half-written file

    def leave_out(self, seconds: float) -> None:
        """Takes `seconds` of other work (an evaluation during training) out of the current logging interval."""
        self._last += seconds

    def _flops(self, counts: dict) -> float | None:
        c = self.flop_coefficients
        if c is None:
            return None
        return float(c["token"] * counts["tokens"] + c["token_sq"] * counts["tokens_sq"]
                     + c["image"] * counts["images"])

    def _rates(self, intervals: list[dict], world_size: int) -> dict:
        seconds = sum(i["seconds"] for i in intervals)
        flops = None if any(i["flops"] is None for i in intervals) else sum(i["flops"] for i in intervals)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        return {
            "tokens_per_second": round(sum(i["tokens"] for i in intervals) / seconds, 1),
            "conversations_per_second": round(sum(i["conversations"] for i in intervals) / seconds, 3),
            "mfu": (round(flops / seconds / (self.peak_flops * max(world_size, 1)), 4)
                    if flops is not None and self.peak_flops else None),
            "peak_memory_gib": round(peak, 2) if peak is not None else None,
        }

    def summary(self, world_size: int = 1) -> dict | None:
        """Rates over the whole run but the first logging interval (start-up), or over it if it is the only one."""
        if not self.intervals:
            return None
        kept = self.intervals[1:] or self.intervals
        return {**self._rates(kept, world_size), "seconds": round(sum(i["seconds"] for i in kept), 3),
                "tokens": sum(i["tokens"] for i in kept), "logging_intervals": len(kept),
                "first_interval_excluded": len(self.intervals) > 1}


def _sum_over_ranks(counts: dict, args) -> dict:
    if args.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return dict(counts)
    t = torch.tensor([float(counts[k]) for k in _FIELDS], dtype=torch.float64, device=args.device)
    torch.distributed.all_reduce(t)  # once per logging step
    return {k: int(v) for k, v in zip(_FIELDS, t.tolist())}


def base_model(model):
    """The model inside a DDP (`.module`) and PEFT (`get_base_model()`) wrapping, or `model` itself."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_flop_coefficients(model) -> dict | None:
    """`flop_coefficients` of a GhostVis (or LLaVA-layout) model, unwrapped from PEFT/DDP; `None` if unknown."""
    from ..bench.train_scenarios import flop_coefficients

    model = base_model(model)
    try:
        vc = model.config.vision_config
        kind = "ghostvis" if hasattr(model.model, "resampler") else "stock"
        return flop_coefficients(model, kind, (vc.image_size // vc.patch_size) ** 2)
    except AttributeError as e:
        logger.warning("throughput: no FLOP formula for %s (%s); MFU not reported", type(model).__name__, e)
        return None


def device_peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU (`bench.train.PEAK_FLOPS`), else `None`."""
    from ..bench.train import PEAK_FLOPS

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class BatchStatsMixin:
    """Trainer mixin: `batch_stats` of every training batch, counted on the host by a `CountingCollator` around the
    trainer's collator and taken out of the batch before the forward; `record_batch_stats` gets them in step order
    (by default into `step_stats`, new for each training dataloader)."""

    def record_batch_stats(self, stats: dict | None) -> None:
        self.step_stats.append(stats)

    def get_train_dataloader(self):
        self.step_stats = []
        collator = self.data_collator
        processing = self.processing_class
        pad = getattr(getattr(processing, "tokenizer", processing), "pad_token_id", None)
        # training batches only: eval batches go to the model as they are
        self.data_collator = CountingCollator(collator, pad)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def get_eval_dataloader(self, eval_dataset=None):
        # evaluation batches are not training batches either: a collator keeping running counts (the packing
        # collator's `stats`, logged as `packing_efficiency`) counts them in a copy of its own
        collator = self.data_collator
        if dataclasses.is_dataclass(collator) and isinstance(getattr(collator, "stats", None), dict):
            quiet = {"log_every": 0} if hasattr(collator, "log_every") else {}
            self.data_collator = dataclasses.replace(collator, stats=dict.fromkeys(collator.stats, 0), **quiet)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batches:
            self.record_batch_stats(batch.pop(STATS_KEY, None))
        return batches, num_items_in_batch


class ThroughputMixin(BatchStatsMixin):
    """Trainer mixin: counts every training batch on the host and logs the rates (`ThroughputCallback`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.throughput = ThroughputCallback()
        # first, so that the printer and the reporting integrations see the values it adds
        self.callback_handler.callbacks.insert(0, self.throughput)

    def record_batch_stats(self, stats: dict | None) -> None:
        self.throughput.add(stats)

    def evaluate(self, *args, **kwargs):
        """The Trainer's evaluation (`--eval_strategy`); its time is not training time, so the speed log leaves it
        out (its batches were never counted)."""
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.throughput.leave_out(time.perf_counter() - start)


def throughput_summary(trainer) -> dict | None:
    """The run's speed for its summary file (`ThroughputCallback.summary`), or `None` without the callback."""
    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ThroughputCallback)), None)
    return cb.summary(trainer.args.world_size) if cb is not None else None


__all__ = ["BatchStatsMixin", "CountingCollator", "STATS_KEY", "THROUGHPUT_FILE", "ThroughputCallback",
           "ThroughputMixin", "batch_stats",
           "device_peak_flops", "model_flop_coefficients", "throughput_summary"]
