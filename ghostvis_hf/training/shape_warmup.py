"""Per-shape set-up done before the first step instead of in the middle of a run.

cuDNN's attention builds an execution graph for every new input shape (~140 ms for SigLIP-so400m's attention, forward
and backward, on an H200). Token-budget steps feed the vision tower a varying number of images, so a run met a new
shape every few steps: over a 50-step recipe run that was ~10 % of the time, and under DDP every rank waits for the
stalled one. `VisionAttentionWarmup` builds the graphs for every image count the run's plan contains
(`TokenBudgetMixin` computes them) when training begins; the graphs stay cached for the process.
"""

import logging

import torch
from transformers.trainer_callback import TrainerCallback

from ..kernels.attention import warm_up_vision_attention

logger = logging.getLogger("ghostvis")


class VisionAttentionWarmup(TrainerCallback):
    """Calls `kernels.attention.warm_up_vision_attention` for `image_counts` at `on_train_begin` (CUDA, bf16/fp16).

    Args:
        image_counts (`Iterable[int]`): the vision tower's batch sizes the run will meet.
    """

    def __init__(self, image_counts):
        self.image_counts = sorted(set(image_counts))
        self.result = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or args.device.type != "cuda":
            return
        param = next(model.parameters(), None)
        dtype = (torch.bfloat16 if args.bf16 or (param is not None and param.dtype == torch.bfloat16)
                 else torch.float16 if args.fp16 else None)
        if dtype is None:
            return
        self.result = warm_up_vision_attention(model, self.image_counts, dtype)
        if self.result is not None:
            logger.info("vision attention: built cuDNN graphs for %d image counts per step (%s) in %.1f s",
                        len(self.result["image_counts"]), _ranges(self.result["image_counts"]),
                        self.result["seconds"])


def _ranges(counts: list[int]) -> str:
    """`[1, 2, 3, 7]` -> `"1-3, 7"`."""
    out, start = [], None
    for i, n in enumerate(counts):
        start = n if start is None else start
        if i + 1 == len(counts) or counts[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n > start else f"{n}")
            start = None
    return ", ".join(out)


__all__ = ["VisionAttentionWarmup"]
