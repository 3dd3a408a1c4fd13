"""RL recipes (GRPO, RLOO) run a few steps from a saved checkpoint; bad reward settings fail before training."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--max_steps", "2", "--num_train_samples", "16", "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--max_completion_length", "4", "--logging_steps", "1", "--plot", "false"]


@pytest.mark.parametrize("recipe", ["grpo", "rloo"])
def test_rl_recipe_runs_and_saves(recipe, tiny_checkpoint, tmp_path):
    out = tmp_path / recipe
    res = subprocess.run([sys.executable, f"recipes/{recipe}.py", "--model_name_or_path", tiny_checkpoint,
                          "--output_dir", str(out), *FAST], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "rl_summary.json").read_text())
    assert summary["logged_steps"] == 2 and "reward_start" in summary
    assert (out / "model.safetensors").exists() and (out / "modeling_ghostvis.py").exists()
    assert "mean reward: start" in res.stdout


def test_unknown_reward_and_weight_mismatch_fail_before_training(tiny_checkpoint, tmp_path):
    res = subprocess.run([sys.executable, "recipes/grpo.py", "--model_name_or_path", tiny_checkpoint,
                          "--output_dir", str(tmp_path / "x"), "--reward_funcs", "exact_match", "bleu", *FAST],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Unknown reward function 'bleu'" in res.stderr
    res = subprocess.run([sys.executable, "recipes/grpo.py", "--model_name_or_path", tiny_checkpoint,
                          "--output_dir", str(tmp_path / "y"), "--reward_weights", "1.0", "0.5", "0.2", *FAST],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "reward_weights has 3 entries" in res.stderr
