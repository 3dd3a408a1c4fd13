"""Per-part learning rates (LLaVA's `mm_vision_tower_lr` / `mm_projector_lr`) as AdamW parameter groups."""

import logging

import torch

from .arguments import GhostVisArguments

logger = logging.getLogger("ghostvis")


def make_optimizer(model, training_args, args: GhostVisArguments):
    """AdamW with separate learning rates for the vision tower and the glue, as LLaVA's `mm_*_lr`; or `None`.

    `None` (the trainer's own optimizer) unless `vision_tower_lr` or `projector_lr` is set. Pass the result to
    `SFTTrainer(optimizers=(optimizer, None))`: the trainer still builds the LR schedule, which scales every group.
    Biases and norm weights get no weight decay, like the trainer's default.
    """
    if args.vision_tower_lr is None and args.projector_lr is None:
        return None
    if training_args.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError(f"vision_tower_lr/projector_lr build AdamW; optim={training_args.optim!r} is not supported")
    lr = training_args.learning_rate
    group_lr = {"vision": args.vision_tower_lr or lr, "glue": args.projector_lr or lr, "text": lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = ("vision" if ".vision_tower." in f".{name}" else
                "glue" if (".resampler." in f".{name}" or ".multi_modal_projector." in f".{name}") else "text")
        decay = p.ndim >= 2 and "norm" not in name
        groups.setdefault((part, decay), []).append(p)
    param_groups = [{"params": ps, "lr": group_lr[part], "weight_decay": training_args.weight_decay if decay else 0.0}
                    for (part, decay), ps in groups.items()]
    logger.info("optimizer learning rates: %s", group_lr)
    return torch.optim.AdamW(param_groups, lr=lr, betas=(training_args.adam_beta1, training_args.adam_beta2),
                             eps=training_args.adam_epsilon)
