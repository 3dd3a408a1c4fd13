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
        "preset": "small", "steps": 200, "recipe_args": "--cpu_threads 1", "from_steps": 0, **kw})


def test_runs_start_from_the_shared_weights_only_when_asked():
    cmd = precision_curve.command("bf16_master", 3, _args(), "/tmp/x")
    assert "--model_name_or_path" not in cmd and cmd[cmd.index("--seed") + 1] == "3"
    assert cmd[cmd.index("--precision") + 1] == "bf16_master" and cmd[cmd.index("--max_steps") + 1] == "200"
    cmd = precision_curve.command("autocast", 0, _args(), "/tmp/x", steps=50, start="/tmp/start")
    assert cmd[cmd.index("--model_name_or_path") + 1] == "/tmp/start" and cmd[cmd.index("--max_steps") + 1] == "50"


@pytest.mark.parametrize("from_steps", [0, 30])
def test_every_run_starts_from_the_shared_weights_with_from_steps(tmp_path, monkeypatch, from_steps):
    launched = []

    class Proc:
        def __init__(self, cmd, **kwargs):
            launched.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(precision_curve, "_run", lambda cmd, log: launched.append(cmd))
    monkeypatch.setattr(precision_curve.subprocess, "Popen", Proc)
    monkeypatch.setattr(precision_curve, "losses", lambda out, steps: {10: 1.0})
    args = _args(from_steps=from_steps, seeds=[0, 1], parallel=3, out=str(tmp_path))
    curves = precision_curve.run_all(args, str(tmp_path / "tmp"))
    assert set(curves) == {"autocast", "bf16_master"} and set(curves["autocast"]) == {0, 1}
    arms = launched[1:] if from_steps else launched
    assert len(arms) == 4
    if from_steps:  # the shared run first (autocast, its own step count), then every arm from its weights
        shared = launched[0]
        assert shared[shared.index("--max_steps") + 1] == "30" and "--model_name_or_path" not in shared
        weights = shared[shared.index("--output_dir") + 1]
        assert all(cmd[cmd.index("--model_name_or_path") + 1] == weights for cmd in arms)
    else:
        assert all("--model_name_or_path" not in cmd for cmd in arms)


def test_summary_compares_means_and_same_seed_pairs_after_the_warmup():
    curves = {"autocast": {0: {10: 2.0, 20: 1.0, 30: 1.0}, 1: {10: 4.0, 20: 2.0, 30: 3.0}},
              "bf16_master": {0: {10: 9.0, 20: 1.01, 30: 1.0}, 1: {10: 9.0, 20: 2.0, 30: 3.03}}}
    s = precision_curve.summarize(curves, warmup=10)
    assert s["late_steps"] == [20, 30]  # step 10 (the warm-up) is left out
    assert s["same_seed_rel_gap_after_warmup"]["max"] == pytest.approx(0.01)
    assert s["same_seed_rel_gap_after_warmup"]["mean"] == pytest.approx(0.005)
    assert s["max_rel_gap_of_means_after_warmup"] == pytest.approx(0.03 / 4.0)
    # the noise reference: the autocast seeds' own spread at each step, relative to their mean
    assert s["autocast_seed_spread_after_warmup"]["max"] == pytest.approx(2.0 / 2.0)
