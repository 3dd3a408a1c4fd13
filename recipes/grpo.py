"""RL stage: GRPO with VQA rewards through TRL's `GRPOTrainer`, with KL to a reference model (`beta > 0`) that is
loaded through `trust_remote_code` like the policy.

    accelerate launch recipes/grpo.py                     # tiny CPU default: from a partly trained SFT checkpoint
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/grpo.py \
        --config recipes/configs/grpo_1.5b.yaml           # ZeRO-3: keep ds3_gather_for_generation: true
    accelerate launch recipes/grpo.py --model_name_or_path outputs/ghostvis-tiny-sft --use_peft --lora_r 8

Rewards are named in YAML (`reward_funcs: [exact_match, format]` with `reward_weights: [1.0, 0.2]`), the arguments of
their factories too (`reward_kwargs: {length_penalty: {budget: 16}}`); the registry is `ghostvis_hf.rewards`. The mean
reward is logged every step, plotted (`reward_curve.png`) and summarised.
"""

import os
import sys

import ghostvis_hf  # noqa: F401  (before TRL: quiets bitsandbytes' import-time CPU "kernels" warning)
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

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

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "grpo_tiny.yaml")
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
    trainer = GRPOTrainer(model=checkpoint, reward_funcs=reward_funcs, args=training_args,
                          train_dataset=train_dataset, processing_class=processor,
                          peft_config=peft_config_for(model_args))
    held_out = held_out_before(trainer, processor, rl_args)  # shapes: greedy exact match before RL
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish_rl(trainer, processor, rl_args, "GhostVis GRPO", held_out)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    main(*TrlParser((RLArguments, GRPOConfig, ModelConfig)).parse_args_and_config(argv))
