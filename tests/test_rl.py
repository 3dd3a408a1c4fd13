"""RL recipes (GRPO, RLOO) run a few steps from a saved checkpoint; bad reward settings fail before training."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--max_steps", "2", "--num_train_samples", "16", "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--max_completion_length", "4", "--logging_steps", "1", "--plot", "false",
        "--num_eval_samples", "8"]


@pytest.mark.parametrize("recipe", ["grpo", "rloo"])
def test_rl_recipe_runs_and_saves(recipe, tiny_checkpoint, tmp_path):
    out = tmp_path / recipe
    res = subprocess.run([sys.executable, f"recipes/{recipe}.py", "--model_name_or_path", tiny_checkpoint,
                          "--output_dir", str(out), *FAST], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "rl_summary.json").read_text())
    assert summary["logged_steps"] == 2 and "reward_start" in summary
    acc = summary["held_out_exact_match"]
    assert 0 <= acc["before"] <= 1 and 0 <= acc["after"] <= 1
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


def test_reward_summary_compares_windows_not_endpoints():
    from ghostvis_hf.training import reward_summary

    history = [{"reward": r} for r in (0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.1)] + [{"loss": 1.0}]
    s = reward_summary(history)  # windows of 2: (0.1 + 0.9) / 2 = 0.5 -> (0.8 + 0.1) / 2 = 0.45
    assert s["window"] == 2 and s["logged_steps"] == 10
    assert abs(s["reward_start"] - 0.5) < 1e-9 and abs(s["reward_end"] - 0.45) < 1e-9 and not s["reward_rose"]
    assert reward_summary([{"loss": 1.0}]) == {}
    assert reward_summary([{"reward": 0.2}, {"reward": 0.4}])["reward_rose"]


def _rl_yaml(tmp_path, rewards: str) -> str:
    cfg = tmp_path / "rl.yaml"
    cfg.write_text(f"{rewards}\noutput_dir: {tmp_path / 'out'}\nbf16: false\nreport_to: none\n")
    return str(cfg)


def test_reward_kwargs_from_yaml_reach_the_reward_function(tmp_path):
    from trl import GRPOConfig, ModelConfig, TrlParser

    from ghostvis_hf.training import RLArguments, reward_funcs_for

    cfg = _rl_yaml(tmp_path, "reward_funcs: [exact_match, length_penalty]\nreward_weights: [1.0, 0.5]\n"
                             "reward_kwargs:\n  length_penalty: {budget: 2, unit: chars}")
    parser = TrlParser((RLArguments, GRPOConfig, ModelConfig))
    rl_args, training_args, _ = parser.parse_args_and_config(["--config", cfg])
    _, penalty = reward_funcs_for(rl_args, training_args)
    assert (penalty.budget, penalty.unit) == (2, "chars") and penalty(["abcd", "abcdefgh"]) == [-1 / 3, -1.0]
    # the command line (JSON, as TRL's own *_kwargs fields) beats the YAML
    rl_args, training_args, _ = parser.parse_args_and_config(
        ["--config", cfg, "--reward_kwargs", '{"length_penalty": {"budget": 8}}'])
    _, penalty = reward_funcs_for(rl_args, training_args)
    assert (penalty.budget, penalty.unit) == (8, "words")


@pytest.mark.parametrize(
    "rewards,message",
    [
        ("reward_funcs: [exact_match, length_penalty]\nreward_kwargs: {length_penalty: {max_length: 64}}",
         "Unknown argument(s) ['max_length'] for reward 'length_penalty'; allowed: budget, unit"),
        ("reward_funcs: [exact_match, lenght_penalty]", "Unknown reward function 'lenght_penalty'"),
    ],
)
def test_bad_reward_settings_in_yaml_fail_before_the_model_loads(tmp_path, rewards, message):
    # No such checkpoint: the reward error must come first (before loading, or bootstrapping, any model).
    res = subprocess.run([sys.executable, "recipes/grpo.py", "--config", _rl_yaml(tmp_path, rewards),
                          "--model_name_or_path", str(tmp_path / "no-such-checkpoint")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and f"ValueError: {message}" in res.stderr, res.stderr[-3000:]
