"""The trainer the SFT and alignment recipes use: TRL's `SFTTrainer` plus token-budget steps, a speed log and,
optionally, the model's own loss, and the recipes' optimizer under FSDP2.

`TokenBudgetMixin` (`training.sampler`) makes a step `per_device_train_batch_size` rows of `max_length` tokens when
`--packing --token_budget` are on; `ThroughputMixin` (`training.throughput`) logs tokens/s, conversations/s, MFU and
peak memory at every logging step; `ModelLossMixin` takes the training loss from the model's forward;
`OwnOptimizerMixin` hands the recipes' optimizer to the Trainer under FSDP2, where it refuses `optimizers=`;
`GraphedStepMixin` (`training.graph_step`) replays the decoder and loss as CUDA graphs with `--cuda_graphs`.
"""

import torch
from transformers import Trainer
from trl import SFTTrainer

from ..kernels.attention import reads_cu_seq_lens
from .graph_step import GraphedStepMixin, no_mask_mapping
from .launch import fsdp_version, sharded_by
from .optimizer import MasterWeightOptimizer
from .sampler import TokenBudgetMixin
from .throughput import ThroughputMixin


class OwnOptimizerMixin:
    """The recipes' optimizer (`make_optimizer`: per-part learning rates, bf16 + fp32 master weights) under FSDP too.

    The Trainer refuses `optimizers=` under FSDP ("override `create_optimizer`"): this takes the optimizer from
    `optimizers` and hands it over in `create_optimizer`, which under FSDP2 runs before accelerate shards the model;
    accelerate then swaps the optimizer's parameters for their shards (`MasterWeightOptimizer` makes its fp32
    copies from those). With bf16 master weights and accelerate's mixed precision off (`make_optimizer` turns it
    off there: accelerate would upcast the bf16 model to fp32), the forward runs in bf16 autocast here instead, as
    it does on one GPU.
    """

    def __init__(self, *args, optimizers=(None, None), **kwargs):
        optimizer, scheduler = optimizers
        training_args = kwargs.get("args")
        self._own_optimizer = None
        if optimizer is not None and sharded_by(training_args) == "FSDP":
            if fsdp_version(training_args) != 2:  # FSDP1 makes the optimizer after flattening the parameters
                raise ValueError("the recipes' own optimizer (--precision bf16_master, --vision_tower_lr, "
                                 "--projector_lr) runs under FSDP2 only: set fsdp_version: 2 in the accelerate config")
            self._own_optimizer, optimizer = optimizer, None
        self._bf16_autocast = (isinstance(self._own_optimizer, MasterWeightOptimizer) and training_args.bf16
                               and training_args.mixed_precision == "no"
                               and getattr(self._own_optimizer, "autocast", True))  # --master_autocast
        super().__init__(*args, optimizers=(optimizer, scheduler), **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self._own_optimizer is not None:
            self.optimizer = self._own_optimizer
        return super().create_optimizer(model)

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        if self._bf16_autocast:
            return torch.autocast(self.args.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return super().autocast_smart_context_manager(cache_enabled)


class ModelLossMixin:
    """Training loss from the model's own forward (`model_loss=True`) instead of TRL's fused LM head.

    With the kernels on, GhostVis's forward computes the loss with the fused linear cross-entropy and never builds
    the logits. TRL's path scores the same tokens with its own head and also logs entropy, token accuracy and a token
    count, reading three values back from the GPU every step; this path reads none (the speed log counts tokens on
    the host), at the price of those two metrics. Evaluation and `return_outputs` keep TRL's path. Packed rows whose
    attention reads `cu_seq_lens` get the decoder's mask mapping ready-made (`no_mask_mapping`), as the CUDA-graph
    step does.
    """

    def __init__(self, *args, model_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_loss = model_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model_loss or return_outputs or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        cu_seq_lens = inputs.get("cu_seq_lens_q")
        if cu_seq_lens is not None and inputs.get("attention_mask") is None and reads_cu_seq_lens(
                self.model.config, cu_seq_lens.device, next(self.model.parameters()).dtype):
            # packed rows that the attention keeps apart by `cu_seq_lens`: the decoder needs no masks, and left to build
            # them transformers reads `position_ids` back on the host (a sync every step) for a [B, 1, T, T] mask
            # nothing reads
            inputs["attention_mask"] = no_mask_mapping(self.model.config)
        return Trainer.compute_loss(self, model, inputs, False, num_items_in_batch)


class GhostVisSFTTrainer(GraphedStepMixin, ModelLossMixin, OwnOptimizerMixin, ThroughputMixin, TokenBudgetMixin,
                         SFTTrainer):
    """`SFTTrainer` + token-budget steps (`--packing --token_budget`) + tokens/s, MFU, peak memory in every log +
    the model's own loss (`model_loss=True`) + the recipes' optimizer under FSDP2 + the decoder and loss as CUDA
    graphs (`cuda_graphs=True`)."""


__all__ = ["GhostVisSFTTrainer", "ModelLossMixin", "OwnOptimizerMixin"]
