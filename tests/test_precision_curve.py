"""scripts/precision_curve.py (issue 16): the runs it launches and the statistics it reports."""

import argparse
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import precision_curve  # noqa: E402

sys.path.pop(0)


def _args(**kw):
    return argparse.Namespace(**{
        "preset": "small", "steps": 200, "recipe_args": "--cpu_threads 1", "from_steps": 0, "learning_rate": 2e-4,
        **kw})


def test_runs_start_from_the_shared_weights_only_when_asked():
    cmd = precision_curve.command("bf16_master", 3, _args(), "/tmp/x")
    assert "--model_name_or_path" not in cmd and cmd[cmd.index("--seed") + 1] == "3"
    assert cmd[cmd.index("--precision") + 1] == "bf16_master" and cmd[cmd.index("--max_steps") + 1] == "200"
    cmd = precision_curve.command("bf16_master_fp32res", 3, _args(), "/tmp/x")
    assert cmd[cmd.index("--precision") + 1] == "bf16_master" and cmd[cmd.index("--fp32_residual") + 1] == "true"
    cmd = precision_curve.command("autocast", 0, _args(), "/tmp/x", steps=50, start="/tmp/start")
    assert cmd[cmd.index("--model_name_or_path") + 1] == "/tmp/start" and cmd[cmd.index("--max_steps") + 1] == "50"


def test_the_learning_rate_reaches_every_run_and_recipe_args_still_override_it():
    for precision in ("autocast", "bf16_master", "autocast_unfused"):
        cmd = precision_curve.command(precision, 1, _args(learning_rate=3e-4), "/tmp/x")
        assert float(cmd[cmd.index("--learning_rate") + 1]) == 3e-4
    # the control is autocast with PyTorch's own kernels
    cmd = precision_curve.command("autocast_unfused", 1, _args(), "/tmp/x")
    assert cmd[cmd.index("--precision") + 1] == "autocast" and cmd[cmd.index("--kernels") + 1] == "false"
    # recipe args come last: argparse keeps the last value of a repeated flag
    cmd = precision_curve.command("autocast", 1, _args(recipe_args="--learning_rate 1e-3"), "/tmp/x")
    assert max(i for i, a in enumerate(cmd) if a == "--learning_rate") > cmd.index("--learning_rate")
    assert cmd[len(cmd) - 1 - cmd[::-1].index("--learning_rate") + 1] == "1e-3"


@pytest.mark.parametrize("from_steps", [0, 30])
def test_every_run_starts_from_the_shared_weights_with_from_steps(tmp_path, monkeypatch, from_steps):
    launched = []

    gpus = []

    class Proc:
        def __init__(self, cmd, env=None, **kwargs):
            launched.append(cmd)
            gpus.append(env)

        def wait(self):
            return 0

    monkeypatch.setattr(precision_curve, "_run", lambda cmd, log, env: (launched.append(cmd), gpus.append(env)))
    monkeypatch.setattr(precision_curve.subprocess, "Popen", Proc)
    monkeypatch.setattr(precision_curve, "losses", lambda out, steps: {10: 1.0})
    args = _args(from_steps=from_steps, seeds=[0, 1], parallel=3, out=str(tmp_path), gpus=2,
                 precisions=["autocast", "bf16_master", "bf16_master_fp32res"])
    curves, held_out = precision_curve.run_all(args, str(tmp_path / "tmp"))
    assert set(curves) == {"autocast", "bf16_master", "bf16_master_fp32res"} and set(curves["autocast"]) == {0, 1}
    assert held_out is None and all("--eval_strategy" not in cmd for cmd in launched)  # not asked for
    arms = launched[1:] if from_steps else launched
    visible = [env["CUDA_VISIBLE_DEVICES"] for env in gpus]  # one GPU per process (TRL refuses DataParallel)
    assert len(arms) == 6 and visible == ["0"] * bool(from_steps) + ["0", "1", "0", "0", "1", "0"]
    if from_steps:  # the shared run first (autocast, its own step count), then every arm from its weights
        shared = launched[0]
        assert shared[shared.index("--max_steps") + 1] == "30" and "--model_name_or_path" not in shared
        weights = shared[shared.index("--output_dir") + 1]
        assert all(cmd[cmd.index("--model_name_or_path") + 1] == weights for cmd in arms)
    else:
        assert all("--model_name_or_path" not in cmd for cmd in arms)


def test_summary_compares_each_variant_to_the_first_after_the_warmup_and_late():
    curves = {"autocast": {0: {10: 2.0, 20: 1.0, 30: 1.0}, 1: {10: 4.0, 20: 2.0, 30: 3.0}},
              "bf16_master": {0: {10: 9.0, 20: 1.01, 30: 1.0}, 1: {10: 9.0, 20: 2.0, 30: 3.03}},
              "bf16_master_fp32res": {0: {10: 3.0, 20: 1.0, 30: 1.0}, 1: {10: 3.0, 20: 2.0, 30: 3.0}}}
    s = precision_curve.summarize(curves, warmup=10, late_from=30)
    assert s["reference"] == "autocast" and s["after_warmup_steps"] == [20, 30]  # step 10 (the warm-up) left out
    g = s["gap_after_warmup"]["bf16_master"]
    assert g["same_seed"]["max"] == pytest.approx(0.01) and g["same_seed"]["mean"] == pytest.approx(0.005)
    assert g["max_abs"] == pytest.approx(0.03 / 4.0)
    assert g["mean_signed"] == pytest.approx((0.005 / 1.5 + 0.015 / 2.0) / 2)
    assert s["gap_late"]["bf16_master"]["max_abs"] == pytest.approx(0.03 / 4.0) and s["late_steps"] == [30]
    assert s["gap_after_warmup"]["bf16_master_fp32res"]["max_abs"] == 0.0
    # the noise reference: the reference seeds' own spread at each step, relative to their mean
    assert s["reference_seed_spread_after_warmup"]["max"] == pytest.approx(2.0 / 2.0)


def test_report_names_every_variant(tmp_path):
    curves = {"autocast": {0: {10: 2.0, 20: 1.0}, 1: {10: 4.0, 20: 2.0}},
              "bf16_master_fp32res": {0: {10: 2.1, 20: 1.0}, 1: {10: 4.0, 20: 2.1}}}
    args = _args(seeds=[0, 1], warmup=0, out=str(tmp_path))
    report = {"curves": curves, "device": "cpu", "torch": "x", "command": "c",
              "summary": precision_curve.summarize(curves, warmup=0)}
    precision_curve.write(report, args)
    text = (tmp_path / "precision_curve.md").read_text()
    assert "**bf16_master_fp32res** vs autocast" in text and "| gap bf16_master_fp32res |" in text


def test_held_out_loss_is_asked_of_every_arm_but_the_shared_start(tmp_path, monkeypatch):
    launched = []

    class Proc:
        def __init__(self, cmd, env=None, **kwargs):
            launched.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(precision_curve, "_run", lambda cmd, log, env: launched.append(cmd))
    monkeypatch.setattr(precision_curve.subprocess, "Popen", Proc)
    monkeypatch.setattr(precision_curve, "losses", lambda out, steps, key="loss": {10: 1.0 if key == "loss" else 2.0})
    args = _args(from_steps=30, seeds=[0, 1], parallel=4, out=str(tmp_path), gpus=1, eval_every=10, eval_rows=64,
                 precisions=["autocast", "bf16_master"])
    curves, held_out = precision_curve.run_all(args, str(tmp_path / "tmp"))
    assert "--eval_strategy" not in launched[0]  # the shared start
    for cmd in launched[1:]:
        assert cmd[cmd.index("--eval_strategy") + 1] == "steps" and cmd[cmd.index("--eval_steps") + 1] == "10"
        assert cmd[cmd.index("--num_eval_samples") + 1] == "64"
    assert held_out == {"autocast": {0: {10: 2.0}, 1: {10: 2.0}}, "bf16_master": {0: {10: 2.0}, 1: {10: 2.0}}}
    assert curves["bf16_master"][1] == {10: 1.0}


def test_paired_gaps_and_their_interval():
    """Per seed, the variant's window mean over the reference's (same seed) - 1; their mean and 95 % t-interval."""
    curves = {"autocast": {0: {10: 1.0, 20: 1.0}, 1: {10: 2.0, 20: 2.0}, 2: {10: 1.0, 20: 3.0}},
              "bf16_master": {0: {10: 1.01, 20: 1.01}, 1: {10: 2.0, 20: 2.0}, 2: {10: 2.04, 20: 2.04}}}
    s = precision_curve.summarize(curves, warmup=0)
    p = s["paired_after_warmup"]["bf16_master"]
    assert p["per_seed"] == pytest.approx([0.01, 0.0, 0.02])
    assert p["mean"] == pytest.approx(0.01)
    half = 4.303 * 0.01 / 3 ** 0.5  # t(0.975, 2 df) x stdev / sqrt(n)
    assert p["ci95"] == pytest.approx([0.01 - half, 0.01 + half])
    late = precision_curve.summarize(curves, warmup=0, late_from=20)["paired_late"]["bf16_master"]
    assert late["per_seed"] == pytest.approx([0.01, 0.0, 2.04 / 3 - 1])  # step 20 only
    one = precision_curve.summarize({k: {0: v[0]} for k, v in curves.items()}, warmup=0)
    assert one["paired_late"]["bf16_master"]["ci95"] is None  # one seed: no interval


def test_report_has_the_held_out_section_and_the_paired_lines(tmp_path):
    curves = {"autocast": {0: {10: 2.0, 20: 1.0}, 1: {10: 4.0, 20: 2.0}},
              "bf16_master": {0: {10: 2.1, 20: 1.0}, 1: {10: 4.0, 20: 2.1}}}
    held = {"autocast": {0: {10: 1.0, 20: 0.8}, 1: {10: 1.0, 20: 0.8}},
            "bf16_master": {0: {10: 1.01, 20: 0.8}, 1: {10: 1.0, 20: 0.808}}}
    args = _args(seeds=[0, 1], warmup=0, out=str(tmp_path), eval_every=10, eval_rows=64)
    report = {"curves": curves, "device": "cpu", "torch": "x", "command": "c",
              "summary": precision_curve.summarize(curves, warmup=0),
              "eval_curves": held, "eval_summary": precision_curve.summarize(held, warmup=0)}
    precision_curve.write(report, args)
    text = (tmp_path / "precision_curve.md").read_text()
    assert "## Held-out loss (64 rows, every 10 steps)" in text
    assert text.count("paired by seed") == 2 and "95 % interval" in text
    assert "| 20 | 0.8000 | 0.8040 | +0.50% |" in text
