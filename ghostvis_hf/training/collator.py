"""The SFT collator: TRL's vision collator, with labels masked at image placeholders, or GhostVis packing.

NOTE: TRL's SFTTrainer computes the loss with its own fused LM head (trl `add_fused_lm_head`), which bypasses the
model's own label masking at image tokens; the mask therefore has to be in the labels the collator returns.
"""

from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from ..modeling_ghostvis import image_label_mask
from .packing import prepare_packing


class GhostVisVisionCollator(DataCollatorForVisionLanguageModeling):
    """`DataCollatorForVisionLanguageModeling` whose labels never include image placeholders or their frame tokens."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch["labels"][image_label_mask(batch["input_ids"], self.processor)] = -100
        return batch


def build_sft_collator(processor, training_args, args=None):
    """`(collator, callbacks)` for `SFTTrainer`: GhostVis packing with `--packing`, else the masking collator.

    With `--packing` and `args.token_budget` (`GhostVisArguments`), a step is `per_device_train_batch_size` rows of
    `max_length` tokens (`packing.TokenBudget`, with `args.packing_window` and `args.truncate_long_rows`); the trainer
    then needs `training.sampler.TokenBudgetMixin`.
    """
    collator, callbacks = prepare_packing(
        processor, training_args, token_budget=bool(getattr(args, "token_budget", False)),
        window=getattr(args, "packing_window", 1024), truncation=bool(getattr(args, "truncate_long_rows", False)),
    )
    if collator is not None:
        return collator, callbacks
    collator = GhostVisVisionCollator(
        processor,
        max_length=training_args.max_length,
        pad_to_multiple_of=training_args.pad_to_multiple_of,
        assistant_only_loss=training_args.assistant_only_loss,
        completion_only_loss=bool(training_args.completion_only_loss),
    )
    return collator, []
