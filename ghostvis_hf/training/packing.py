"""Sequence packing for vision-language SFT: several conversations, with their images, per row.

TRL refuses `packing` and `padding_free` for image datasets. GhostVis packs in the collator instead:

- each conversation is tokenized with the processor (image placeholders expanded, assistant mask as TRL's vision
  collator computes it), then the conversations are packed into rows of at most `max_length` tokens by best-fit
  decreasing;
- `position_ids` restart at 0 for every conversation and no `attention_mask` is returned: transformers 5 then
  builds a block-diagonal causal mask from the restarts (`masking_utils.find_packed_sequence_indices`, for sdpa,
  eager, flex and flash), and `cu_seq_lens_q/k` + `max_length_q/k` let flash-attn or GhostVis's varlen attention
  (`ghostvis_hf.kernels.attention`) skip the cross-sample blocks entirely;
- `labels` are -100 at each conversation's first token (no prediction across a boundary), at image placeholder
  and frame tokens, at padding, and outside assistant turns with `assistant_only_loss`;
- `pixel_values` follow the packed order, so the model's `masked_scatter` puts every image back at its placeholders.

Padding between rows, if any, is a separate pseudo-sample (positions 0..n-1, labels -100): it never attends to or
is attended by a real token.

Token-budget batches (`TokenBudget`, issue 16): a step is `rows` x `max_length` tokens. The batch sampler
(`training.sampler`) picks the conversations of a step by best-fit decreasing over a window of the shuffled stream
and hands them over bin after bin; the collator then cuts that sequence greedily into rows (`in_order`), which never
needs more rows than the sampler's bins, and pads to exactly `rows` rows of `max_length` (static shapes).
"""

import bisect
import logging
from dataclasses import dataclass, field

import torch
from transformers.trainer_callback import TrainerCallback

from ..modeling_ghostvis import image_label_mask

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


def _check_lengths(lengths: list[int], capacity: int) -> None:
    if any(n > capacity or n <= 0 for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}], got max {max(lengths)} / min {min(lengths)}")


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Packs items into as few bins of `capacity` as best-fit decreasing finds.

    Args:
        lengths (`list[int]`): item sizes, each in `[1, capacity]`.
        capacity (`int`): bin size (tokens per row).

    Returns:
        `list[list[int]]`: item indices per bin, in the order they were placed (longest first).

    Example:
    ```python
    >>> best_fit_decreasing([5, 3, 4, 2, 6], capacity=8)
    [[4, 3], [0, 1], [2]]

    ```
    """
    _check_lengths(lengths, capacity)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))  # tightest bin that still fits
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            remaining, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (remaining - lengths[i], b))
    return bins


@dataclass(frozen=True)
class TokenBudget:
    """What a token-budget step is: `rows` rows of `max_length` tokens.

    Args:
        rows (`int`): rows per step and device (`per_device_train_batch_size`).
        max_length (`int`): tokens per row.
        window (`int`, *optional*, defaults to 1024): conversations of the shuffled stream the sampler packs together
            by best-fit decreasing (larger: fuller rows, less mixing of the stream order).
        truncation (`bool`, *optional*, defaults to `False`): cut conversations longer than `max_length` instead of
            refusing the dataset.
    """

    rows: int
    max_length: int
    window: int = 1024
    truncation: bool = False

    def __post_init__(self):
        if self.rows < 1 or self.max_length < 1 or self.window < 1:
            raise ValueError(f"rows, max_length and window must be positive, got {self}")


def next_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Cuts the items, in their order, into consecutive bins of at most `capacity`.

    Greedy consecutive cutting is optimal among consecutive cuttings: it never needs more bins than any partition of
    the same sequence into consecutive groups that fit, such as the sampler's best-fit bins laid end to end.

    Example:
    ```python
    >>> next_fit([5, 3, 4, 2, 6], capacity=8)
    [[0, 1], [2, 3], [4]]

    ```
    """
    _check_lengths(lengths, capacity)
    bins: list[list[int]] = []
    used = capacity
    for i, n in enumerate(lengths):
        if used + n > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def pack_samples(samples: list[dict], max_length: int, pad_token_id: int, padding_free: bool = False,
                 pad_to_multiple_of: int | None = None, rows: int | None = None, in_order: bool = False) -> dict:
    """Packs tokenized samples into rows.

    Args:
        samples (`list[dict]`): each with `input_ids` and `labels` (1-D lists or tensors of one length) and
            optionally `pixel_values` (`[n_images, 3, H, W]`, the sample's images in placeholder order).
        max_length (`int`): tokens per row (the packing budget).
        pad_token_id (`int`): id for the padding at the end of short rows.
        padding_free (`bool`, *optional*, defaults to `False`): concatenate all rows into one row without padding.
        pad_to_multiple_of (`int`, *optional*): round the row length up to a multiple of this.
        rows (`int`, *optional*): return exactly this many rows of `max_length` (padding rows added); more only if
            the samples need more (logged).
        in_order (`bool`, *optional*, defaults to `False`): cut the samples into rows in their order (`next_fit`)
            instead of best-fit decreasing.

    Returns:
        `dict`: `input_ids`, `labels`, `position_ids` (`[rows, L]`), `pixel_values` (if any sample has images),
        `cu_seq_lens_q/k` (`[n_segments + 1]` int32 over the flattened rows), `max_length_q/k` (`int`), and
        `num_real_tokens` / `num_slots` (ints, for the packing efficiency; popped by the collator).
    """
    lengths = [len(s["input_ids"]) for s in samples]
    bins = (next_fit if in_order else best_fit_decreasing)(lengths, max_length)
    if padding_free:
        bins = [[i for b in bins for i in b]]
    row_len = max(sum(lengths[i] for i in b) for b in bins)
    if pad_to_multiple_of:
        row_len = -(-row_len // pad_to_multiple_of) * pad_to_multiple_of
    if rows is not None and not padding_free:
        if len(bins) > rows:  # the lengths the sampler planned with were shorter than these: still train on them
            logger.warning("token budget: %d conversations need %d rows of %d, more than %d", len(samples),
                           len(bins), max_length, rows)
        bins += [[] for _ in range(rows - len(bins))]
        row_len = max_length
    ids, labels, pos, pixels, segments = [], [], [], [], []
    for b in bins:
        row_ids, row_labels, row_pos = [], [], []
        for i in b:
            s = samples[i]
            x = torch.as_tensor(s["input_ids"], dtype=torch.long)
            y = torch.as_tensor(s["labels"], dtype=torch.long).clone()
            y[0] = IGNORE_INDEX  # its first token would be predicted from the previous sample's last token
            row_ids.append(x)
            row_labels.append(y)
            row_pos.append(torch.arange(len(x)))
            segments.append(len(x))
            if s.get("pixel_values") is not None and len(s["pixel_values"]):
                pixels.append(torch.as_tensor(s["pixel_values"]))
        n_pad = row_len - sum(lengths[i] for i in b)
        if n_pad:
            row_ids.append(torch.full((n_pad,), pad_token_id, dtype=torch.long))
            row_labels.append(torch.full((n_pad,), IGNORE_INDEX, dtype=torch.long))
            row_pos.append(torch.arange(n_pad))
            segments.append(n_pad)
        ids.append(torch.cat(row_ids))
        labels.append(torch.cat(row_labels))
        pos.append(torch.cat(row_pos))
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
    out = {
        "input_ids": torch.stack(ids),  # [rows, L]
        "labels": torch.stack(labels),
        "position_ids": torch.stack(pos),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(segments),
        "max_length_k": max(segments),
        "num_real_tokens": sum(lengths),
        "num_slots": len(bins) * row_len,
    }
    if pixels:
        out["pixel_values"] = torch.cat(pixels)  # [n_images, 3, H, W], packed order
    return out


def _prepare_messages(example: dict) -> tuple[list[dict], list]:
    images = example.get("images")
    if images is None and example.get("image") is not None:
        images = [example["image"]]
    images = list(images or [])
    try:
        from trl.data_utils import prepare_multimodal_messages
    except ImportError:  # the same: attach the images, in order, to the {"type": "image"} parts
        it = iter(images)
        messages = [
            {**m, "content": [({**p, "image": next(it)} if p.get("type") == "image" else p) for p in m["content"]]}
            if isinstance(m["content"], list) else m
            for m in example["messages"]
        ]
        return messages, images
    return prepare_multimodal_messages(example["messages"], images=images), images


@dataclass
class GhostVisPackingCollator:
    """Collates conversational vision rows (`messages` + `images`) into packed rows; usable as `SFTTrainer`'s
    `data_collator`.

    Args:
        processor (`GhostVisProcessor`): tokenizes and processes images.
        max_length (`int`, *optional*, defaults to 2048): tokens per packed row; longer conversations are truncated
            (the processor refuses to cut through an image's placeholders).
        assistant_only_loss (`bool`, *optional*, defaults to `False`): train on assistant turns only.
        padding_free (`bool`, *optional*, defaults to `False`): one row per batch with no padding at all.
        pad_to_multiple_of (`int`, *optional*): round the row length up.
        chat_template (`str`, *optional*): overrides the processor's template.
        log_every (`int`, *optional*, defaults to 50): log the running packing efficiency every this many batches.
        token_budget (`TokenBudget`, *optional*): token-budget steps: the examples arrive bin after bin from
            `training.sampler.TokenBudgetBatchSampler`, are cut into rows in that order and padded to exactly
            `token_budget.rows` rows of `max_length`; conversations longer than `max_length` are refused unless
            `token_budget.truncation`.

    The running efficiency (real tokens / token slots) is `self.efficiency`; `PackingStatsCallback` adds it to the
    Trainer logs.
    """

    processor: object
    max_length: int = 2048
    assistant_only_loss: bool = False
    padding_free: bool = False
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None
    log_every: int = 50
    token_budget: TokenBudget | None = None
    stats: dict = field(default_factory=lambda: {"batches": 0, "real_tokens": 0, "slots": 0, "rows": 0, "samples": 0})

    def __post_init__(self):
        if self.token_budget is not None and (self.token_budget.max_length != self.max_length or self.padding_free):
            raise ValueError(f"token_budget {self.token_budget} needs max_length={self.token_budget.max_length} and "
                             f"padding_free=False, got {self.max_length} / {self.padding_free}")

    @property
    def efficiency(self) -> float:
        return self.stats["real_tokens"] / max(self.stats["slots"], 1)

    def tokenize(self, examples: list[dict]) -> list[dict]:
        """Per-example `input_ids`, `labels` and `pixel_values`, unpadded (what would be one row each unpacked)."""
        prepared = [_prepare_messages(e) for e in examples]
        processor_kwargs = {
            "padding": True,
            "padding_side": "right",
            "truncation": self.token_budget is None or self.token_budget.truncation,
            "max_length": self.max_length,
            "add_special_tokens": False,
        }
        out = self.processor.apply_chat_template(
            [m for m, _ in prepared],
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=self.assistant_only_loss,
            processor_kwargs=processor_kwargs,
        )
        samples, start = [], 0
        pixel_values = out.get("pixel_values")
        for i, (_, images) in enumerate(prepared):
            n = int(out["attention_mask"][i].sum())
            ids = out["input_ids"][i, :n]
            labels = ids.clone()
            labels[image_label_mask(ids, self.processor)] = IGNORE_INDEX
            if self.assistant_only_loss:
                labels[out["assistant_masks"][i, :n] == 0] = IGNORE_INDEX
            sample = {"input_ids": ids, "labels": labels}
            if images:
                sample["pixel_values"] = pixel_values[start : start + len(images)]
                start += len(images)
            samples.append(sample)
        return samples

    def __call__(self, examples: list[dict]) -> dict:
        batch = pack_samples(
            self.tokenize(examples),
            max_length=self.max_length,
            pad_token_id=self.processor.tokenizer.pad_token_id,
            padding_free=self.padding_free,
            pad_to_multiple_of=self.pad_to_multiple_of,
            rows=self.token_budget.rows if self.token_budget else None,
            in_order=self.token_budget is not None,
        )
        s = self.stats
        s["batches"] += 1
        s["real_tokens"] += batch.pop("num_real_tokens")
        s["slots"] += batch.pop("num_slots")
        s["rows"] += batch["input_ids"].shape[0]
        s["samples"] += len(examples)
        if self.log_every and s["batches"] % self.log_every == 0:
            logger.info(
                "packing: %d batches, %.1f samples/row, efficiency %.1f%% (real tokens / token slots)",
                s["batches"], s["samples"] / max(s["rows"], 1), 100 * self.efficiency,
            )
        return batch


class PackingStatsCallback(TrainerCallback):
    """Adds `packing_efficiency` (running real tokens / token slots) to every Trainer log.

    NOTE: with `dataloader_num_workers > 0` the collator runs in worker processes and these counters stay at 0.
    Callbacks run in order, so reporting integrations registered before this one (`report_to`) do not see the
    value; the console log and `trainer_state.json` (`state.log_history`) do.
    """

    def __init__(self, collator: GhostVisPackingCollator):
        self.collator = collator

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.collator.stats["slots"]:
            logs["packing_efficiency"] = round(self.collator.efficiency, 4)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["packing_efficiency"] = logs["packing_efficiency"]


def prepare_packing(processor, training_args, token_budget: bool = False, window: int = 1024,
                    truncation: bool = False) -> tuple[GhostVisPackingCollator | None, list]:
    """What `recipes/sft.py --packing` calls: a packing collator and its logging callback.

    If `training_args.packing` (TRL's own `SFTConfig.packing` flag) is set, it is switched off again, because TRL
    raises for packed image datasets, and GhostVis packs in the collator instead. `max_length` (default 2048),
    `assistant_only_loss` and `pad_to_multiple_of` are read from the same config; `padding_free` must be off.

    With `token_budget`, a step is `per_device_train_batch_size` rows of `max_length` tokens (`TokenBudget`); the
    trainer needs `training.sampler.TokenBudgetMixin` to pick the conversations of each step.

    Args:
        processor: the GhostVis processor.
        training_args (`trl.SFTConfig`): the training config.
        token_budget (`bool`, *optional*, defaults to `False`): token-budget steps instead of packing the
            `per_device_train_batch_size` conversations of each batch.
        window (`int`, *optional*, defaults to 1024): `TokenBudget.window`.
        truncation (`bool`, *optional*, defaults to `False`): `TokenBudget.truncation`.

    Returns:
        `(collator, callbacks)`: `(None, [])` when packing is off.
    """
    if not getattr(training_args, "packing", False):
        return None, []
    if getattr(training_args, "padding_free", False):
        raise ValueError("--packing and --padding_free are exclusive for image datasets: use --packing alone")
    training_args.packing = False  # TRL: "Packing is not supported for vision datasets"
    max_length = training_args.max_length or 2048
    budget = None
    if token_budget:
        budget = TokenBudget(training_args.per_device_train_batch_size, max_length, window, truncation)
    collator = GhostVisPackingCollator(
        processor,
        max_length=max_length,
        assistant_only_loss=bool(getattr(training_args, "assistant_only_loss", False)),
        pad_to_multiple_of=None if budget else getattr(training_args, "pad_to_multiple_of", None),
        token_budget=budget,
    )
    return collator, [PackingStatsCallback(collator)]


__all__ = ["TokenBudget", "best_fit_decreasing", "next_fit", "pack_samples", "GhostVisPackingCollator",
           "PackingStatsCallback", "prepare_packing"]
