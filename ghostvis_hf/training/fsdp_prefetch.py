"""`--fsdp_forward_prefetch N`: under FSDP2, each sharded layer starts the all-gathers of the next N layers of its
stack when its own forward starts.

FSDP2 issues a unit's all-gather when the host reaches that unit's forward. The all-gather runs on its own stream, so
it overlaps the layers before it only as far as the host runs ahead of the GPU; on a step bound by the host (the
recipes' 1.5b step on an H200) the host is barely ahead, and each layer can wait for its own parameters. Explicit
prefetching (`FSDPModule.set_modules_to_forward_prefetch`, torch's FSDP2 API for this) issues them N layers
earlier. With `reshard_after_forward: false` (accelerate_configs/fsdp2.yaml) the gathered parameters stay until the
backward anyway, so prefetching costs no memory there; with resharding it holds up to N more layers gathered.
"""

import logging

import torch
from transformers.trainer_callback import TrainerCallback

logger = logging.getLogger("ghostvis")


def check_forward_prefetch(depth: int) -> None:
    """Refuses a negative `--fsdp_forward_prefetch` (0: FSDP2's own order)."""
    if depth < 0:
        raise ValueError(f"fsdp_forward_prefetch must be >= 0, got {depth}")


def set_forward_prefetch(model: torch.nn.Module, depth: int) -> int:
    """For every `nn.ModuleList` of the model with two or more FSDP2 units (the decoder layers, the resampler's
    blocks), each unit prefetches the next `depth` units of its list in the forward. Returns the units set.

    Example:
    ```python
    >>> import torch
    >>> set_forward_prefetch(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)])), depth=2)  # no FSDP2
    0

    ```
    """
    check_forward_prefetch(depth)
    if depth == 0:
        return 0
    from torch.distributed.fsdp import FSDPModule

    units_set = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        units = [m for m in module if isinstance(m, FSDPModule)]
        if len(units) < 2:
            continue
        for i, unit in enumerate(units[:-1]):
            unit.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + depth])
        units_set += len(units) - 1
    return units_set


class ForwardPrefetchCallback(TrainerCallback):
    """Sets the FSDP2 forward prefetching when training starts (the model is sharded by then)."""

    def __init__(self, depth: int):
        self.depth = depth

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            n = set_forward_prefetch(model, self.depth)
            logger.info("fsdp_forward_prefetch: %d FSDP2 units prefetch the next %d", n, self.depth)


def fsdp_prefetch_callbacks(depth: int) -> list:
    """`[ForwardPrefetchCallback(depth)]` for `--fsdp_forward_prefetch N` > 0, else `[]`."""
    check_forward_prefetch(depth)
    return [ForwardPrefetchCallback(depth)] if depth else []
