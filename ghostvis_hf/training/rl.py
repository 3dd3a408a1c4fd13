"""What the RL recipes (GRPO, RLOO) share: rewards from the arguments, the starting SFT checkpoint, the held-out
accuracy before and after, and the reward summary.

The tiny CPU default starts from a *partly* trained SFT checkpoint on shapes so there is room for the reward to rise;
if none is given and none exists yet, the SFT recipe's tiny default runs first for a few hundred steps.
"""

import logging
import os
import subprocess
import sys

from .arguments import RLArguments
from .finish import finish

logger = logging.getLogger("ghostvis")


def reward_funcs_for(args: RLArguments, training_args) -> list:
    """The reward functions named by `reward_funcs`, built with `reward_kwargs`, checked against `reward_weights`.

    Called before anything slow, so a misspelt reward or argument fails before the model is loaded.

    Raises:
        `ValueError`: an unknown reward name, arguments for a reward that takes none or is not in `reward_funcs`, an
            unknown factory argument, or `reward_weights` of another length.
    """
    from ..rewards import get_reward_funcs

    funcs = get_reward_funcs(args.reward_funcs, args.reward_kwargs)
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} entries but reward_funcs names {len(funcs)}")
    return funcs


def starting_checkpoint(model_name_or_path: str | None, output_dir: str, steps: int, sft_recipe: str) -> str:
    """The SFT checkpoint RL starts from; if none is given, runs the SFT recipe's tiny default for `steps` steps."""
    if model_name_or_path:
        return model_name_or_path
    path = os.path.join(os.path.dirname(os.path.abspath(output_dir)), "ghostvis-tiny-sft-partial")
    if os.path.exists(os.path.join(path, "config.json")):
        logger.info("starting from the partly trained SFT checkpoint %s", path)
        return path
    logger.info("no --model_name_or_path: running %s for %d steps to make %s", sft_recipe, steps, path)
    # Only as many SFT rows as the steps consume (32 per step in the tiny config), not the full main job's data.
    subprocess.run([sys.executable, sft_recipe, "--max_steps", str(steps), "--num_train_samples", str(32 * steps),
                    "--output_dir", path,
                    "--save_strategy", "no", "--eval_after_training", "false", "--plot", "false"], check=True)
    return path


def policy_checkpoint(rl_args: RLArguments, training_args, model_args, sft_recipe: str):
    """The checkpoint RL starts from and its processor; policy and reference load through the checkpoint's own code.

    Sets what the TRL RL trainers read when they load `model=checkpoint` themselves (`trust_remote_code`, the
    `dtype` of `ModelConfig` in `model_init_kwargs`).
    """
    from transformers import AutoProcessor

    checkpoint = starting_checkpoint(model_args.model_name_or_path, training_args.output_dir,
                                     rl_args.bootstrap_sft_steps, sft_recipe)
    training_args.trust_remote_code = True
    if model_args.dtype is not None:
        training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "dtype": model_args.dtype}
    return checkpoint, AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)


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


def held_out_before(trainer, processor, args: RLArguments) -> tuple | None:
    """`(rows, exact match)`: held-out shapes questions of the trained types and the policy's greedy exact match on
    them before training; None for other data, 0 samples, several processes or a resumed run."""
    if (args.dataset_name != "shapes" or not args.num_eval_samples or trainer.args.world_size > 1
            or trainer.args.resume_from_checkpoint):
        return None
    from ..data.shapes import load_shapes

    rows = load_shapes("test", num_samples=args.num_eval_samples,
                       question_types=tuple(args.question_types or ("color", "shape")))
    return rows, held_out_accuracy(trainer, processor, rows)


def held_out_accuracy(trainer, processor, rows) -> float:
    """Greedy exact match of the current policy on `rows`."""
    from ..evaluation.run import evaluate

    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    result = evaluate(model, processor, "shapes", rows, batch_size=64)
    model.train(was_training)
    return result["exact_match"]


def finish_rl(trainer, processor, args: RLArguments, title: str, held_out=None) -> dict | None:
    """The shared `finish` for RL: reward summary (+ held-out exact match before/after), `reward_curve.png`,
    `rl_summary.json`; prints the comparison on the main process."""
    summary = reward_summary(trainer.state.log_history)
    if held_out is not None:  # from `held_out_before`
        rows, before = held_out
        summary["held_out_exact_match"] = {"before": before, "after": held_out_accuracy(trainer, processor, rows)}
    has_kl = any("kl" in e for e in trainer.state.log_history)
    origin = f"Trained with {title} on {args.dataset_name}."
    summary = finish(trainer, processor, trainer.args.output_dir, origin=origin, summary=summary,
                     summary_file="rl_summary.json", plot=args.plot, title=title, plot_file="reward_curve.png",
                     plot_keys=("reward", "kl") if has_kl else ("reward",))
    if summary is None:
        return None
    if "reward_start" in summary:
        print(f"mean reward: start {summary['reward_start']:.3f} -> end {summary['reward_end']:.3f} "
              f"({'rose' if summary['reward_rose'] else 'did not rise'}; means of the first and last "
              f"{summary['window']} of {summary['logged_steps']} logged steps)", flush=True)
    if "held_out_exact_match" in summary:
        acc = summary["held_out_exact_match"]
        print(f"held-out exact match ({args.num_eval_samples} questions): before {acc['before']:.1%} -> after "
              f"{acc['after']:.1%}", flush=True)
    return summary
