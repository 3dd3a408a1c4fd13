"""RL stage: GRPO with VQA rewards through TRL's `GRPOTrainer`, with KL to a reference model (`beta > 0`) that is
loaded through `trust_remote_code` like the policy.

    accelerate launch recipes/grpo.py                     # tiny CPU default: from a partly trained SFT checkpoint
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/grpo.py \
        --config recipes/configs/grpo_1.5b.yaml           # ZeRO-3: keep ds3_gather_for_generation: true
    accelerate launch recipes/grpo.py --model_name_or_path outputs/ghostvis-tiny-sft --use_peft --lora_r 8

Rewards are named in YAML (`reward_funcs: [exact_match, format]` with `reward_weights: [1.0, 0.2]`); the registry is
`ghostvis_hf.rewards.REWARD_FUNCS`. The mean reward is logged every step, plotted (`reward_curve.png`) and summarised.
"""

import os
import sys

from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

from ghostvis_hf.rl import RLArguments, run

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "grpo_tiny.yaml")

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    rl_args, training_args, model_args = TrlParser((RLArguments, GRPOConfig, ModelConfig)).parse_args_and_config(argv)
    run(GRPOTrainer, rl_args, training_args, model_args, "GhostVis GRPO",
        sft_recipe=os.path.join(os.path.dirname(__file__), "sft.py"))
