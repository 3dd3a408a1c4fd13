"""RL stage, REINFORCE variant: RLOO (REINFORCE with a leave-one-out baseline) through TRL's `RLOOTrainer`, same
rewards, data and start checkpoint as `recipes/grpo.py`.

    accelerate launch recipes/rloo.py                     # tiny CPU default
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/rloo.py \
        --config recipes/configs/rloo_tiny.yaml --model_name_or_path outputs/ghostvis-1.5b-sft
"""

import os
import sys

import ghostvis_hf  # noqa: F401  (before TRL: quiets bitsandbytes' import-time CPU "kernels" warning)
from trl import ModelConfig, RLOOConfig, RLOOTrainer, TrlParser

from ghostvis_hf.training import (
    RLArguments,
    finish_rl,
    held_out_before,
    peft_config_for,
    policy_checkpoint,
    prompt_dataset,
    reward_funcs_for,
    setup_logging,
)

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "rloo_tiny.yaml")
SFT_RECIPE = os.path.join(os.path.dirname(__file__), "sft.py")


def main(rl_args, training_args, model_args):
    setup_logging()
    ################
    # Rewards and dataset (first: a misspelt reward must fail before the model is loaded or bootstrapped)
    ################
    reward_funcs = reward_funcs_for(rl_args, training_args)
    train_dataset = prompt_dataset(rl_args)

    ################
    # Model: policy and reference both come from the checkpoint's own code (trust_remote_code)
    ################
    checkpoint, processor = policy_checkpoint(rl_args, training_args, model_args, SFT_RECIPE)

    ################
    # Training
    ################
    trainer = RLOOTrainer(model=checkpoint, reward_funcs=reward_funcs, args=training_args,
                          train_dataset=train_dataset, processing_class=processor,
                          peft_config=peft_config_for(model_args))
    held_out = held_out_before(trainer, processor, rl_args)  # shapes: greedy exact match before RL
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish_rl(trainer, processor, rl_args, "GhostVis RLOO", held_out)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    main(*TrlParser((RLArguments, RLOOConfig, ModelConfig)).parse_args_and_config(argv))
