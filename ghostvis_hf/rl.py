"""What the RL recipes (GRPO, RLOO) share: prompt-only data, the starting SFT checkpoint, reward set-up, summary.

The tiny CPU default starts from a *partly* trained SFT checkpoint on shapes so there is room for the reward to rise;
if none is given and none exists yet, the SFT recipe's tiny default runs first for a few hundred steps.
"""

import json
import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger("ghostvis")


@dataclass
class RLArguments:
    """Arguments shared by `recipes/grpo.py` and `recipes/rloo.py`."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_match", "format"],
        metadata={"help": "Reward names from ghostvis_hf.rewards.REWARD_FUNCS (weights: reward_weights)."},
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


def prompt_dataset(args: RLArguments):
    """Prompt-only rows (`prompt`, `images`, `answers`) as TRL's GRPO/RLOO trainers expect."""
    from . import data

    if args.dataset_name == "shapes":
        from .data.shapes import load_shapes

        ds = load_shapes("train", num_samples=args.num_train_samples, seed=args.dataset_seed,
                         question_types=tuple(args.question_types or ("color", "shape")))
    else:
        if args.dataset_path is None:
            raise ValueError(f"--dataset_path is required for dataset_name={args.dataset_name!r}")
        ds = data.get_dataset(args.dataset_name, path_or_hub_id=args.dataset_path, split="train",
                              limit=args.num_train_samples)

    def to_prompt(row):
        return {"prompt": [m for m in row["messages"] if m["role"] != "assistant"]}

    return ds.map(to_prompt, remove_columns=["messages"])


def starting_checkpoint(model_name_or_path: str | None, output_dir: str, steps: int, sft_recipe: str) -> str:
    """The SFT checkpoint RL starts from; if none is given, runs the SFT recipe's tiny default for `steps` steps."""
    if model_name_or_path:
        return model_name_or_path
    path = os.path.join(os.path.dirname(os.path.abspath(output_dir)), "ghostvis-tiny-sft-partial")
    if os.path.exists(os.path.join(path, "config.json")):
        logger.info("starting from the partly trained SFT checkpoint %s", path)
        return path
    import subprocess
    import sys

    logger.info("no --model_name_or_path: running %s for %d steps to make %s", sft_recipe, steps, path)
    # Only as many SFT rows as the steps consume (32 per step in the tiny config), not the full main job's data.
    subprocess.run([sys.executable, sft_recipe, "--max_steps", str(steps), "--num_train_samples", str(32 * steps),
                    "--output_dir", path,
                    "--save_strategy", "no", "--eval_after_training", "false", "--plot", "false"], check=True)
    return path


def reward_summary(log_history: list[dict], fraction: float = 0.2) -> dict:
    """Mean reward over the first and the last `fraction` of the logged steps (at least one each).

    A logged reward averages only a few prompts, so single points are noisy: compare windows, not endpoints.
    """
    rewards = [e["reward"] for e in log_history if "reward" in e]
    if not rewards:
        return {}
    k = max(1, min(len(rewards) // 2, round(len(rewards) * fraction)))
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    return {"reward_start": first, "reward_end": last, "reward_rose": last > first, "logged_steps": len(rewards),
            "window": k}


def held_out_rows(trainer, args: RLArguments):
    """Held-out shapes questions of the trained types, or None (other data, 0 samples, or several processes)."""
    if args.dataset_name != "shapes" or not args.num_eval_samples or trainer.args.world_size > 1:
        return None
    from .data.shapes import load_shapes

    return load_shapes("test", num_samples=args.num_eval_samples,
                       question_types=tuple(args.question_types or ("color", "shape")))


def held_out_accuracy(trainer, processor, rows) -> float:
    """Greedy exact match of the current policy on `rows` (from `held_out_rows`)."""
    from .evaluation.run import evaluate

    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    result = evaluate(model, processor, "shapes", rows, batch_size=64)
    model.train(was_training)
    return result["exact_match"]


def finish(trainer, processor, output_dir: str, args: RLArguments, title: str, held_out=None) -> dict:
    """Saves the policy as a complete checkpoint, plots the reward curve, prints and writes the summary."""
    from .hub import model_card
    from .plotting import plot_learning_curve

    trainer.save_model(output_dir)
    summary = reward_summary(trainer.state.log_history)
    if held_out is not None:  # (rows, accuracy before training)
        rows, before = held_out
        summary["held_out_exact_match"] = {"before": before, "after": held_out_accuracy(trainer, processor, rows)}
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "README.md"), "w") as f:
            f.write(model_card(trainer.accelerator.unwrap_model(trainer.model), repo=output_dir,
                               origin=f"Trained with {title} on {args.dataset_name}."))
        if args.plot:
            plot_learning_curve(trainer.state.log_history, os.path.join(output_dir, "reward_curve.png"),
                                title=title, keys=("reward", "kl") if any("kl" in e for e in
                                                                          trainer.state.log_history) else ("reward",))
        with open(os.path.join(output_dir, "rl_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if summary:
            print(f"mean reward: start {summary['reward_start']:.3f} -> end {summary['reward_end']:.3f} "
                  f"({'rose' if summary['reward_rose'] else 'did not rise'}; means of the first and last "
                  f"{summary['window']} of {summary['logged_steps']} logged steps)", flush=True)
        if "held_out_exact_match" in summary:
            acc = summary["held_out_exact_match"]
            print(f"held-out exact match ({args.num_eval_samples} questions): before {acc['before']:.1%} -> after "
                  f"{acc['after']:.1%}", flush=True)
    return summary


def run(trainer_cls, rl_args: RLArguments, training_args, model_args, title: str, sft_recipe: str) -> dict:
    """The body of both RL recipes: start checkpoint, prompts, rewards, train, save, summary."""
    from transformers import AutoProcessor

    from .rewards import get_reward_funcs
    from .training import peft_config_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Model: policy and reference both come from the checkpoint's own code
    checkpoint = starting_checkpoint(model_args.model_name_or_path, training_args.output_dir,
                                     rl_args.bootstrap_sft_steps, sft_recipe)
    training_args.trust_remote_code = True
    if model_args.dtype is not None:
        training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "dtype": model_args.dtype}
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    # Dataset + rewards (validated before any training step)
    reward_funcs = get_reward_funcs(rl_args.reward_funcs)
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(weights)} entries but reward_funcs names {len(reward_funcs)}")
    train_dataset = prompt_dataset(rl_args)
    # Training
    trainer = trainer_cls(model=checkpoint, reward_funcs=reward_funcs, args=training_args,
                          train_dataset=train_dataset, processing_class=processor,
                          peft_config=peft_config_for(model_args))
    rows = None if training_args.resume_from_checkpoint else held_out_rows(trainer, rl_args)
    held_out = None if rows is None else (rows, held_out_accuracy(trainer, processor, rows))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return finish(trainer, processor, training_args.output_dir, rl_args, title, held_out)
