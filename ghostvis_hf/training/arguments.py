"""The recipes' own arguments, next to TRL's `SFTConfig`/`GRPOConfig`/`RLOOConfig` and `ModelConfig` in one `TrlParser`.

`GhostVisArguments` is shared by `recipes/align.py` and `recipes/sft.py`, `RLArguments` by `recipes/grpo.py` and
`recipes/rloo.py`. Like open-r1's script arguments, every field can be set in the recipe's YAML or on the command line.
"""

import json
from dataclasses import dataclass, field


@dataclass
class GhostVisArguments:
    """Model-source and data arguments shared by the alignment and SFT recipes."""

    preset: str = field(default="tiny", metadata={"help": "Preset to create when no model path/backbones are given."})
    text_model: str | None = field(default=None, metadata={"help": "Pretrained LM (path/Hub id) to compose from."})
    vision_model: str | None = field(default=None, metadata={"help": "Pretrained encoder (path/Hub id) to compose."})
    resampler_type: str | None = field(default=None, metadata={"help": "perceiver | avgpool | none (new models)."})
    num_image_tokens: int | None = field(default=None, metadata={"help": "Image tokens per image (new models)."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Overrides of the preset's GhostVisConfig for new models, comma-separated key=value with "
                          "dotted keys into the sub-configs, e.g. 'text_config.num_hidden_layers=4,resampler_depth=2'."},
    )
    dataset_mixture: list[str] | None = field(
        default=None,
        metadata={"help": "Datasets to mix, each `name:path_or_hub_id:weight` (e.g. vqav2:/data/vqa:0.8 "
                          "text_chat:/data/smoltalk.jsonl:0.2); overrides dataset_name."},
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the built-in data (same held-out set as eval)."})
    num_train_samples: int | None = field(default=None, metadata={"help": "Rows of training data to use."})
    num_eval_samples: int | None = field(default=None, metadata={"help": "Held-out rows for the final evaluation."})
    shapes_max_turns: int = field(
        default=1,
        metadata={"help": "Built-in shapes data: up to this many QA turns per training image (the held-out split "
                          "stays single-turn)."},
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Keep the vision encoder frozen."})
    freeze_language_model: bool = field(default=False, metadata={"help": "Keep the decoder and LM head frozen."})
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower (LLaVA's mm_vision_tower_lr); "
                                        "defaults to learning_rate."})
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the resampler + projector (LLaVA's mm_projector_lr); "
                                        "defaults to learning_rate."})
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "PyTorch threads when training on the CPU; 0 = every core this process may use. "
                          "`accelerate launch` without a config pins a CPU run to OMP_NUM_THREADS=1."},
    )
    bad_rows: str = field(default="skip", metadata={"help": "skip (count and drop) | error (refuse, naming the row)."})
    kernels: bool = field(default=True, metadata={"help": "Swap in fused kernels on CUDA (ghostvis_hf.kernels)."})
    eval_after_training: bool = field(default=True, metadata={"help": "Generate on the held-out split and score."})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the final generation-based eval."})
    plot: bool = field(default=True, metadata={"help": "Save a learning-curve plot in the output folder."})


@dataclass
class RLArguments:
    """Arguments shared by `recipes/grpo.py` and `recipes/rloo.py`."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_match", "format"],
        metadata={"help": "Reward names from ghostvis_hf.rewards.REWARD_FUNCS (weights: reward_weights)."},
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Arguments of the reward factories, per reward name, e.g. in YAML `reward_kwargs: "
                          "{length_penalty: {budget: 16, unit: words}}` (a JSON string on the command line); "
                          "configurable: ghostvis_hf.rewards.REWARD_FACTORIES."},
    )
    dataset_name: str = field(default="shapes", metadata={"help": "shapes | vqav2 | textvqa | chartqa | coco_captions"})
    dataset_path: str | None = field(default=None, metadata={"help": "Local folder/file or Hub id (not for shapes)."})
    question_types: list[str] | None = field(
        default_factory=lambda: ["color", "shape"], metadata={"help": "shapes question types to train on."}
    )
    num_train_samples: int = field(default=2000, metadata={"help": "Prompts to train on."})
    dataset_seed: int = field(default=1, metadata={"help": "Seed of the built-in data (1: other rows than SFT's)."})
    bootstrap_sft_steps: int = field(
        default=250, metadata={"help": "Steps of the short SFT run that makes a starting checkpoint if none exists."}
    )
    plot: bool = field(default=True, metadata={"help": "Save a reward curve in the output folder."})
    num_eval_samples: int = field(
        default=500,
        metadata={"help": "shapes: held-out questions (of the trained types) scored greedily before and after RL on "
                          "a single process; 0 skips."},
    )

    def __post_init__(self):
        if isinstance(self.reward_kwargs, str):  # from the command line, as TRL's own `*_kwargs` fields
            self.reward_kwargs = json.loads(self.reward_kwargs)
        if self.reward_kwargs is not None and not isinstance(self.reward_kwargs, dict):
            raise ValueError(f"reward_kwargs must map reward names to their arguments, got {self.reward_kwargs!r}")
