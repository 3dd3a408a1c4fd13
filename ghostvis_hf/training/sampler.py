"""Token-budget batches (issue 16): every step is `rows` x `max_length` tokens, filled from the shuffled stream.

The plan of an epoch is a pure function of (lengths, seed, epoch): the conversations are shuffled, cut into windows
of `window` conversations, each window is packed into bins of `max_length` tokens by best-fit decreasing (the bins
shuffled again, as BFD emits the long ones first), and consecutive bins make the steps, `rows` bins each. Every
conversation is in exactly one bin per epoch. Rank r of W takes global steps r, r + W, r + 2W, ...: disjoint bins and
the same number of steps on every rank (the global step count is rounded up to a multiple of W; the last steps of an
epoch then carry fewer bins, and the collator pads them to `rows` rows).

Ranks run their steps in lockstep (every step ends in a gradient reduction), so a step takes as long as its slowest
rank. Bins are full of tokens but not of work: a bin of short conversations carries more images (one SigLIP-so400m
image costs about as much as 200 text tokens of the 1.5b decoder) and a bin of long ones more attention. Given each
conversation's cost (`costs`, FLOPs by the speed log's formula), the bins of the W steps that run together are dealt
out again among the ranks, heaviest first to the lightest rank with a free row, then exchanged between the heaviest
rank and the others while that lowers it (`_balance`): on 2x H200 at 8 rows of 2048 the dealing took DDP from 1.74x to
1.82x one GPU's tokens/s, FSDP2 from 1.63x to 1.73x (docs/benchmarks/scaling_8rows.md).

The Trainer needs one length for every epoch, so `len()` is the largest step count of the epochs it will run (an
epoch that packs tighter spreads its bins over the same number of steps). Resuming needs nothing of its own: the
Trainer skips the steps already done (`accelerate.skip_first_batches`) and the plan of that epoch is the same again.

Conversation lengths come from the chat template and the tokenizer alone, as the collator will count them (every
`<image>` marker grows into the image's placeholder run), without decoding a single image. Over-long conversations
are refused up front, naming the row, unless truncation is configured.

NOTE: `TokenBudgetBatchSampler` subclasses transformers' `BatchRebalanceSampler` for one reason:
`Trainer._get_dataloader` passes that class as `batch_sampler` and turns accelerate's re-sharding of it into a
pass-through, since it already yields each rank's own batches. None of the parent's logic is used.
TRL's `pack_dataset(strategy="bfd")` packs a tokenized dataset once, globally, into rows; it knows nothing of
images, steps or ranks, so it is not reused here.
"""

import logging
import math
import random

from transformers.trainer_callback import TrainerCallback
from transformers.trainer_pt_utils import BatchRebalanceSampler

from .packing import best_fit_decreasing
from .shape_warmup import VisionAttentionWarmup
from .throughput import base_model, model_flop_coefficients

logger = logging.getLogger("ghostvis")


def conversation_lengths(dataset, processor, max_length: int | None = None, truncation: bool = False,
                         batch_size: int = 1000, return_images: bool = False):
    """Token count of every conversation as the packing collator will tokenize it, without decoding images.

    Args:
        dataset (`datasets.Dataset`): rows with `messages` (TRL's conversational format).
        processor (`GhostVisProcessor`): its chat template and tokenizer; `num_image_tokens` per image.
        max_length (`int`, *optional*): refuse (or with `truncation`, clip to) this length.
        truncation (`bool`, *optional*, defaults to `False`): clip instead of refusing.
        batch_size (`int`, *optional*, defaults to 1000): rows tokenized together.
        return_images (`bool`, *optional*, defaults to `False`): also return the `<image>` markers of every row.

    Returns:
        `list[int]`: one length per row; with `return_images`, `(lengths, images)`.

    Raises:
        `ValueError`: a conversation is longer than `max_length` and `truncation` is off (the first such row named).
    """
    grow = processor.num_image_tokens + 1  # an <image> marker becomes start + N placeholders + end
    lengths: list[int] = []
    images: list[int] = []
    first_long = None  # (row, its text): the index alone may not find it once bad rows were dropped
    for batch in dataset.select_columns(["messages"]).with_format("arrow").iter(batch_size=batch_size):
        texts = [processor.apply_chat_template(row["messages"]) for row in batch.to_pylist()]
        for text, ids in zip(texts, processor.tokenizer(texts, add_special_tokens=False)["input_ids"]):
            images.append(ids.count(processor.image_marker_id))
            lengths.append(len(ids) + grow * images[-1])
            if first_long is None and max_length is not None and lengths[-1] > max_length:
                first_long = (len(lengths) - 1, text)
    if first_long is not None and not truncation:
        i, text = first_long
        raise ValueError(
            f"conversation {i} of the training set ({text[:80]!r}...) has {lengths[i]} tokens, more than "
            f"max_length={max_length} ({sum(n > max_length for n in lengths)} such rows): raise max_length, drop "
            "those rows, or allow truncation (--truncate_long_rows)")
    if first_long is not None:
        lengths = [min(n, max_length) for n in lengths]
    return (lengths, images) if return_images else lengths


def balance_costs(model, lengths: list[int], images: list[int]) -> list[float] | None:
    """Each conversation's training FLOPs for balancing the ranks: the speed log's formula (`token`, `token_sq`,
    `image` coefficients), with a frozen vision tower's images at a third (forward only, where the formula counts
    forward and backward as MFU conventions do); `None` for a model without the formula."""
    c = model_flop_coefficients(model)
    if c is None:
        return None
    tower = getattr(getattr(base_model(model), "model", None), "vision_tower", None)
    image = c["image"]
    if tower is not None and not any(p.requires_grad for p in tower.parameters()):
        image /= 3.0
    return [c["token"] * n + c["token_sq"] * n * n + image * k for n, k in zip(lengths, images)]


class TokenBudgetBatchSampler(BatchRebalanceSampler):
    """Yields, per step, the dataset indices of this rank's `rows` bins, bin after bin.

    Args:
        lengths (`list[int]`): tokens of every conversation, each in `[1, max_length]`.
        rows (`int`): bins (rows) per step and rank.
        max_length (`int`): tokens per bin.
        window (`int`, *optional*, defaults to 1024): conversations packed together by best-fit decreasing.
        seed (`int`, *optional*, defaults to 0): the plan of epoch e is a function of `seed` and e.
        num_replicas (`int`, *optional*, defaults to 1): data-parallel ranks.
        rank (`int`, *optional*, defaults to 0): this rank.
        num_epochs (`int`, *optional*, defaults to 1): epochs `len()` must cover (see `plan_epochs`).
        costs (`list[float]`, *optional*): work of every conversation (e.g. its training FLOPs); with several
            ranks, the bins of the steps that run at the same time are balanced over the ranks by it.
    """

    def __init__(self, lengths: list[int], rows: int, max_length: int, *, window: int = 1024, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, num_epochs: int = 1, costs: list[float] | None = None):
        # NOTE: no super().__init__(): see the module docstring.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        bad = next((i for i, n in enumerate(lengths) if not 0 < n <= max_length), None)
        if bad is not None:
            raise ValueError(f"conversation {bad} has {lengths[bad]} tokens, not in [1, max_length={max_length}]")
        if costs is not None and len(costs) != len(lengths):
            raise ValueError(f"{len(costs)} costs for {len(lengths)} conversations")
        self.lengths, self.rows, self.max_length, self.window = list(lengths), rows, max_length, window
        self.costs = None if costs is None else [float(c) for c in costs]
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0
        self.drop_last = True  # read by accelerate's BatchSamplerShard: never loop back to the start
        self._plans: dict[int, list[list[list[int]]]] = {}
        self._imbalances: dict[int, tuple[float, float]] = {}
        self._bin_counts: dict[int, int] = {}
        self.steps_per_rank = 0
        self.plan_epochs(num_epochs)

    def plan_epochs(self, num_epochs: int) -> int:
        """Makes `len()` cover epochs `0 .. num_epochs - 1`; returns the steps per epoch and rank."""
        for epoch in range(num_epochs):
            if epoch not in self._bin_counts:
                self._bin_counts[epoch] = len(self._bins(epoch))
            self.steps_per_rank = max(self.steps_per_rank,
                                      math.ceil(self._bin_counts[epoch] / self.rows / self.num_replicas))
        if len(self.lengths) < self.steps_per_rank * self.num_replicas:
            raise ValueError(f"{len(self.lengths)} conversations cannot fill {self.steps_per_rank} steps on each of "
                             f"{self.num_replicas} ranks")
        self._plans.clear()
        return self.steps_per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _bins(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"ghostvis-token-budget/{self.seed}/{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        bins: list[list[int]] = []
        for start in range(0, len(order), self.window):
            window = order[start : start + self.window]
            packed = [[window[i] for i in b] for b in best_fit_decreasing([self.lengths[j] for j in window],
                                                                          self.max_length)]
            rng.shuffle(packed)
            bins += packed
        return bins

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """The global steps of `epoch` (all ranks), each a list of bins; rank r takes steps r, r + W, ..."""
        if epoch not in self._plans:
            steps, imbalance = self._steps(self._bins(epoch)), (1.0, 1.0)
            if self.costs is not None and self.num_replicas > 1:
                before = self._imbalance(steps)
                w = self.num_replicas
                steps = [step for g in range(0, len(steps), w) for step in self._balance(steps[g : g + w])]
                imbalance = (self._imbalance(steps), before)
            self._plans = {epoch: steps}  # keep one epoch
            self._imbalances = {epoch: imbalance}
        return self._plans[epoch]

    def _steps(self, bins: list[list[int]]) -> list[list[list[int]]]:
        n_steps = self.steps_per_rank * self.num_replicas
        while len(bins) < n_steps:  # an epoch that packs tighter than the longest one: more, smaller bins
            k = max(range(len(bins)), key=lambda i: len(bins[i]))
            if len(bins[k]) < 2:
                raise RuntimeError(f"{len(self.lengths)} conversations cannot fill {n_steps} steps")
            bins[k : k + 1] = [bins[k][:-1], bins[k][-1:]]
        if len(bins) > n_steps * self.rows:
            raise RuntimeError(f"{len(bins)} bins do not fit {n_steps} steps of {self.rows} rows; "
                               "plan_epochs() was not called for this epoch")
        steps, i = [], 0
        for s in range(n_steps):  # full steps first, the tail spread so that no step is empty
            take = min(self.rows, len(bins) - i - (n_steps - s - 1))
            steps.append(bins[i : i + take])
            i += take
        return steps

    def _bin_cost(self, b: list[int]) -> float:
        return sum(self.costs[i] for i in b)

    def _balance(self, group: list[list[list[int]]]) -> list[list[list[int]]]:
        """The bins of `group` (the steps of one lockstep step, one per rank) dealt out again over the ranks, at most
        `rows` each and none left empty: heaviest bin first to the lightest rank with a free row (ties to the rank
        with fewer bins, then the lower rank: the plan stays deterministic); then, while it lowers the heaviest rank's
        cost, the best exchange of one of its bins with a lighter one of another rank, or a move to a rank with a free
        row. Dealing alone left the slowest rank 2.2 % above the mean on the 1.5b bench set at 2 x 8 rows (a few
        heavy bins of short conversations, each with its image, land late); the exchanges bring it to ~0.1 %."""
        w = len(group)
        out: list[list[tuple[float, list[int]]]] = [[] for _ in group]
        load = [0.0] * w
        for cost, b in sorted(((self._bin_cost(b), b) for step in group for b in step), key=lambda cb: -cb[0]):
            r = min((r for r in range(w) if len(out[r]) < self.rows), key=lambda r: (load[r], len(out[r]), r))
            out[r].append((cost, b))
            load[r] += cost
        for _ in range(4 * self.rows * w):  # each exchange lowers the sorted loads; the bound is a safeguard
            h = max(range(w), key=lambda r: (load[r], -r))
            best = None  # (the pair's new heavier load, rank, bin of h, bin of the rank or None: a move)
            for r in range(w):
                if r == h:
                    continue
                lighter = [(j, c) for j, (c, _) in enumerate(out[r])]
                if len(out[r]) < self.rows and len(out[h]) > 1:
                    lighter.append((None, 0.0))
                for i, (ci, _) in enumerate(out[h]):
                    for j, cj in lighter:
                        d = ci - cj
                        new = max(load[h] - d, load[r] + d)
                        if d > 0 and new < load[h] * (1 - 1e-12) and (best is None or new < best[0]):
                            best = (new, r, i, j)
            if best is None:
                break
            _, r, i, j = best
            moved = out[h].pop(i)
            if j is not None:
                out[h].append(out[r].pop(j))
                load[h] += out[h][-1][0]
                load[r] -= out[h][-1][0]
            out[r].append(moved)
            load[h] -= moved[0]
            load[r] += moved[0]
        return [[b for _, b in step] for step in out]

    def _imbalance(self, steps: list[list[list[int]]]) -> float:
        """Mean over the lockstep steps of the slowest rank's cost over the mean rank cost."""
        w, ratios = self.num_replicas, []
        for g in range(0, len(steps), w):
            loads = [sum(self._bin_cost(b) for b in step) for step in steps[g : g + w]]
            ratios.append(max(loads) * len(loads) / max(sum(loads), 1e-30))
        return sum(ratios) / len(ratios)

    def rank_imbalance(self, epoch: int = 0) -> tuple[float, float]:
        """`_imbalance` of this epoch's plan and of the same plan before balancing (recorded when it was made);
        (1.0, 1.0) on one rank or without costs."""
        self.plan(epoch)
        return self._imbalances[epoch]

    def _planned_steps(self):
        """Every step (a list of bins) of every planned epoch and rank."""
        for e in sorted(self._bin_counts):
            yield from self.plan(e)

    def images_per_step(self, images: list[int]) -> set[int]:
        """The distinct totals of `images` (one count per conversation) over the steps of every planned epoch and
        rank: the vision tower's batch sizes in this run."""
        return {sum(images[i] for b in step for i in b) for step in self._planned_steps()}

    def max_sequences_per_step(self) -> int:
        """The most packed sequences a step of any planned epoch and rank can have: its conversations plus one padding
        sequence per row (the collator pads each row once; empty rows are one padding sequence)."""
        return max(sum(len(b) for b in step) + self.rows for step in self._planned_steps())

    def __iter__(self):
        for step in self.plan(self.epoch)[self.rank :: self.num_replicas]:
            yield [i for b in step for i in b]

    def __len__(self) -> int:
        return self.steps_per_rank


class _EpochSync(TrainerCallback):
    """Sets the sampler's epoch from the Trainer's step count at every epoch start.

    NOTE: on resume the Trainer wraps the batch sampler in accelerate's `SkipBatchSampler` before calling
    `set_epoch`. On one process it still reaches the sampler under it, but in a distributed run that is
    `SkipBatchSampler(BatchSamplerShard(sampler))`, which neither `DataLoaderShard.set_epoch` nor the Trainer reach
    (transformers 5.24, accelerate 1.15): a run resumed in epoch 2 would replay epoch 0's plan. Remove when they do.
    """

    def __init__(self, sampler: TokenBudgetBatchSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        # the Trainer's own `epochs_trained` (global_step // update steps per epoch), which is the loop's epoch
        per_epoch = max(len(self.sampler) // args.gradient_accumulation_steps
                        + int(len(self.sampler) % args.gradient_accumulation_steps > 0), 1)
        self.sampler.set_epoch(state.global_step // per_epoch)


class TokenBudgetMixin:
    """Trainer mixin: token-budget steps when the data collator has a `token_budget` (`packing.TokenBudget`).

    `class GhostVisSFTTrainer(TokenBudgetMixin, SFTTrainer)`; otherwise the trainer's own sampler is used.
    """

    def _get_train_sampler(self, train_dataset=None):
        budget = getattr(self.data_collator, "token_budget", None)
        if budget is None:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths, images = conversation_lengths(dataset, self.data_collator.processor, budget.max_length,
                                               budget.truncation, return_images=True)
        args = self.args
        costs = balance_costs(self.model, lengths, images) if args.world_size > 1 else None
        sampler = TokenBudgetBatchSampler(
            lengths, budget.rows, budget.max_length, window=budget.window,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            num_replicas=max(args.world_size, 1), rank=args.process_index if args.world_size > 1 else 0,
            costs=costs,
        )
        if args.max_steps > 0:  # the epochs that many steps take, at the first epoch's length (which only grows)
            per_epoch = math.ceil(len(sampler) / args.gradient_accumulation_steps)
            sampler.plan_epochs(math.ceil(args.max_steps / per_epoch))
        else:
            sampler.plan_epochs(math.ceil(args.num_train_epochs))
        tokens = sum(lengths)
        logger.info("token budget: %d conversations (%d tokens) -> %d steps per epoch and rank of %d x %d "
                    "(%.1f%% of the token slots filled)", len(lengths), tokens, len(sampler), budget.rows,
                    budget.max_length, 100 * tokens / (len(sampler) * sampler.num_replicas * budget.rows
                                                        * budget.max_length))
        if costs is not None:
            balanced, plain = sampler.rank_imbalance()
            logger.info("token budget: slowest rank's FLOPs / mean per step %.3f (%.3f without balancing the ranks)",
                        balanced, plain)
        self._replace_callback(_EpochSync(sampler))
        self._token_budget_sampler = sampler  # its plan bounds a step's sequences (`cuda_graphs`)
        self._image_counts = sampler.images_per_step(images)  # of every step of every rank (`cuda_graphs_vision`)
        if self.args.device.type == "cuda":  # the vision attention's warm-up for those counts
            self._replace_callback(VisionAttentionWarmup(self._image_counts))
        return sampler

    def _replace_callback(self, callback) -> None:
        """Adds `callback` in place of any earlier one of its class (the sampler is made again on each `train`)."""
        for cb in [cb for cb in self.callback_handler.callbacks if isinstance(cb, type(callback))]:
            self.callback_handler.remove_callback(cb)
        self.add_callback(callback)


__all__ = ["TokenBudgetBatchSampler", "TokenBudgetMixin", "balance_costs", "conversation_lengths"]
