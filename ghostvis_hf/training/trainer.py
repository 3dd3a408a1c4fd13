"""The trainer the SFT and alignment recipes use: TRL's `SFTTrainer` plus token-budget steps, a speed log and,
optionally, the model's own loss.

`TokenBudgetMixin` (`training.sampler`) makes a step `per_device_train_batch_size` rows of `max_length` tokens when
`--packing --token_budget` are on; `ThroughputMixin` (`training.throughput`) logs tokens/s, conversations/s, MFU and
peak memory at every logging step; `ModelLossMixin` takes the training loss from the model's forward.
"""

from transformers import Trainer
from trl import SFTTrainer

from .sampler import TokenBudgetMixin
from .throughput import ThroughputMixin


class ModelLossMixin:
    """Training loss from the model's own forward (`model_loss=True`) instead of TRL's fused LM head.

    With the kernels on, GhostVis's forward computes the loss with the fused linear cross-entropy and never builds
    the logits. TRL's path scores the same tokens with its own head and also logs entropy, token accuracy and a token
    count, reading three values back from the GPU every step; this path reads none (the speed log counts tokens on
    the host), at the price of those two metrics. Evaluation and `return_outputs` keep TRL's path.
    """

    def __init__(self, *args, model_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_loss = model_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model_loss or return_outputs or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, False, num_items_in_batch)


class GhostVisSFTTrainer(ModelLossMixin, ThroughputMixin, TokenBudgetMixin, SFTTrainer):
    """`SFTTrainer` + token-budget steps (`--packing --token_budget`) + tokens/s, MFU, peak memory in every log +
    the model's own loss (`model_loss=True`)."""


__all__ = ["GhostVisSFTTrainer", "ModelLossMixin"]
