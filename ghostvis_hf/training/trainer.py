"""The trainer the SFT and alignment recipes use: TRL's `SFTTrainer` plus token-budget steps and a speed log.

`TokenBudgetMixin` (`training.sampler`) makes a step `per_device_train_batch_size` rows of `max_length` tokens when
`--packing --token_budget` are on; `ThroughputMixin` (`training.throughput`) logs tokens/s, conversations/s, MFU and
peak memory at every logging step.
"""

from trl import SFTTrainer

from .sampler import TokenBudgetMixin
from .throughput import ThroughputMixin


class GhostVisSFTTrainer(ThroughputMixin, TokenBudgetMixin, SFTTrainer):
    """`SFTTrainer` + token-budget steps (`--packing --token_budget`) + tokens/s, MFU, peak memory in every log."""


__all__ = ["GhostVisSFTTrainer"]
