"""RL stage, REINFORCE variant: RLOO (REINFORCE with a leave-one-out baseline) through TRL's `RLOOTrainer`, same
rewards, data and start checkpoint as `recipes/grpo.py`.

    accelerate launch recipes/rloo.py                     # tiny CPU default
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/rloo.py \
        --config recipes/configs/rloo_tiny.yaml --model_name_or_path outputs/ghostvis-1.5b-sft
"""

import os
import sys

from trl import ModelConfig, RLOOConfig, RLOOTrainer, TrlParser

from ghostvis_hf.rl import RLArguments, run

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "rloo_tiny.yaml")

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    rl_args, training_args, model_args = TrlParser((RLArguments, RLOOConfig, ModelConfig)).parse_args_and_config(argv)
    run(RLOOTrainer, rl_args, training_args, model_args, "GhostVis RLOO",
        sft_recipe=os.path.join(os.path.dirname(__file__), "sft.py"))
