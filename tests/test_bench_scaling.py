"""scripts/bench_scaling.py (issue 17): the row shape of `bench train` plus `gpus`, one CPU smoke run of the recipe,
the refusals, and how the multi-GPU rows are compared with the one-GPU ones."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_scaling  # noqa: E402

sys.path.pop(0)


def test_one_cpu_process_gives_a_row_in_the_bench_train_shape(tmp_path):
    rc = bench_scaling.main(["--setups", "single", "--device", "cpu", "--max-steps", "8", "--logging-steps", "4",
                             "--profile", "--reload-check",
                             "--config", "recipes/configs/sft_tiny.yaml", "--out", str(tmp_path), "--recipe-args",
                             "--shapes_train_samples 256 --per_device_train_batch_size 8 --cpu_threads 1 "
                             "--profile_python true --sync_steps 5:7"])
    assert rc == 0
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert report["benchmark"] == "scaling" and len(report["results"]) == 1
    row = report["results"][0]
    assert {"scenario", "run", "tok_s", "mfu", "peak_mem_gib", "gpus"} <= set(row)
    assert row["gpus"] == 1 and row["failed"] is None and row["tok_s"] > 0 and row["conv_s"] > 0
    assert row["precision"] == "fp32" and row["first_interval_excluded"] is True
    assert "| 1 CPU process | 1 | fp32 |" in (tmp_path / "scaling.md").read_text()
    assert row["reloads"].startswith("yes: GhostVisForConditionalGeneration") and "8 tokens generated" in row["reloads"]
    profile = (tmp_path / "scaling_single_profile_rank0.txt").read_text()  # steps 8-10, after the timed ones
    assert profile.startswith("3 steps: wall") and "GPU busy" in profile
    # --profile_python: the host's time by Python function, the Trainer's own step among them
    python = profile.split("Python functions by inclusive host time")[1].splitlines()
    assert any("training_step" in line and float(line.split("|")[0]) > 0 for line in python[1:])
    syncs = (tmp_path / "scaling_single_syncs_rank0.txt").read_text()  # --sync_steps: CUDA only, and it says so
    assert syncs.startswith("0 syncs in 2 optimizer steps") and "no CUDA device" in syncs


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="unknown setups"):
        bench_scaling.main(["--setups", "zero4", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="need GPUs"):
        bench_scaling.main(["--setups", "single,ddp", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="logging step falls on the 3 profiled steps"):
        bench_scaling.main(["--setups", "single", "--profile", "--max-steps", "8", "--logging-steps", "2"])


def test_a_failed_setup_is_a_row_with_its_reason(tmp_path):
    rc = bench_scaling.main(["--setups", "single", "--device", "cpu", "--out", str(tmp_path), "--recipe-args",
                             "--no_such_flag 1"])
    assert rc == 1
    row = json.loads((tmp_path / "scaling.json").read_text())["results"][0]
    assert row["tok_s"] is None and "no_such_flag" in row["failed"]
    assert (tmp_path / "scaling_single.log").exists()


def test_a_run_that_dies_after_its_speed_was_logged_keeps_that_speed(tmp_path, monkeypatch):
    real_run = bench_scaling.subprocess.run

    def fake_run(cmd, **kwargs):  # the recipe: trains, writes its speed log, then dies while saving
        if "--output_dir" not in cmd:
            return real_run(cmd, **kwargs)
        out = cmd[cmd.index("--output_dir") + 1]
        os.makedirs(out)
        with open(os.path.join(out, "profile_rank0.txt"), "w") as f:
            f.write("3 steps: wall 1.0 s under the profiler\n")
        with open(os.path.join(out, "throughput.json"), "w") as f:
            json.dump({"tokens_per_second": 123.0, "conversations_per_second": 1.5, "mfu": 0.3, "peak_memory_gib": 9.0,
                       "seconds": 4.0, "first_interval_excluded": True, "step": 20}, f)
        kwargs["stdout"].write("Writing model shards\nKilled\n")
        raise bench_scaling.subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(bench_scaling.subprocess, "run", fake_run)
    assert bench_scaling.main(["--setups", "single", "--device", "cpu", "--out", str(tmp_path), "--profile",
                               "--max-steps", "20", "--logging-steps", "10"]) == 1
    row = json.loads((tmp_path / "scaling.json").read_text())["results"][0]
    assert row["failed"].startswith("exit timeout") and row["tok_s"] == 123.0 and row["speed_until_step"] == 20
    assert "(failed after step 20: speed until then) | 1 | - | 123.0 |" in (tmp_path / "scaling.md").read_text()
    assert (tmp_path / "scaling_single_profile_rank0.txt").read_text().startswith("3 steps")  # the profile is kept


def test_multi_gpu_rows_are_compared_with_the_recipe_default_and_their_own_launcher_on_one_gpu():
    rows = [dict(setup="single", gpus=1, tok_s=100.0, precision="bf16_master"),
            dict(setup="single_autocast", gpus=1, tok_s=80.0, precision="bf16"),
            dict(setup="zero2_1gpu", gpus=1, tok_s=75.0, precision="deepspeed_bf16"),
            dict(setup="ddp", gpus=2, tok_s=190.0, precision="bf16_master"),
            dict(setup="ddp_autocast", gpus=2, tok_s=152.0, precision="bf16"),
            dict(setup="zero2", gpus=2, tok_s=150.0, precision="deepspeed_bf16"),
            dict(setup="fsdp2", gpus=2, tok_s=170.0, precision="fsdp_bf16"),
            dict(setup="zero3", gpus=2, tok_s=None, precision=None)]
    bench_scaling.scaling(rows)
    assert (rows[3]["vs_1gpu"], rows[3]["vs_same_1gpu"], rows[3]["vs_same_1gpu_of"]) == (1.9, 1.9, "single")
    assert (rows[4]["vs_1gpu"], rows[4]["vs_same_1gpu"], rows[4]["vs_same_1gpu_of"]) == (1.52, 1.9, "single_autocast")
    assert (rows[5]["vs_1gpu"], rows[5]["vs_same_1gpu"]) == (1.5, 2.0)
    assert rows[6]["vs_1gpu"] == 1.7 and "vs_same_1gpu" not in rows[6]  # FSDP2 on one GPU did not run
    assert "vs_1gpu" not in rows[7] and "vs_1gpu" not in rows[0]


def test_profile_runs_three_more_steps_after_the_timed_ones(tmp_path):
    args = bench_scaling._parser().parse_args(["--setups", "zero2", "--profile", "--max-steps", "30"])
    cmd, _ = bench_scaling.command("zero2", args, str(tmp_path))
    assert cmd[cmd.index("--max_steps") + 1] == "33" and cmd[cmd.index("--profile_steps") + 1] == "30:33"
    assert cmd[cmd.index("--precision") + 1] == "auto"  # the sharded launchers keep their own master weights
    cmd, _ = bench_scaling.command("fsdp2_reshard", args, str(tmp_path))
    assert cmd[cmd.index("--fsdp_reshard_after_forward") + 1] == "true"
    assert cmd.index("--fsdp_reshard_after_forward") < cmd.index("recipes/sft.py")  # a launcher argument


def test_same_data_times_the_same_conversations_on_one_gpu_as_on_two(tmp_path):
    from ghostvis_hf.training.sampler import TokenBudgetBatchSampler

    args = bench_scaling._parser().parse_args(["--setups", "single,fsdp2", "--same-data", "--gpus", "2",
                                               "--max-steps", "30", "--logging-steps", "10", "--profile"])
    cmd, _ = bench_scaling.command("single", args, str(tmp_path))
    assert [cmd[cmd.index(k) + 1] for k in ("--max_steps", "--logging_steps", "--profile_steps")] == ["63", "20",
                                                                                                       "60:63"]
    cmd, _ = bench_scaling.command("fsdp2", args, str(tmp_path))
    assert [cmd[cmd.index(k) + 1] for k in ("--max_steps", "--logging_steps", "--nccl_max_ctas")] == ["33", "10", "8"]
    assert "--nccl_max_ctas" not in bench_scaling.command("fsdp2_nccl_default", args, str(tmp_path))[0]
    # the recipe's sampler: one process's steps 20-59 hold the conversations of two ranks' steps 10-29 (balanced)
    lengths = [(37 * i) % 500 + 20 for i in range(3000)]
    costs = [float(n) + 300.0 * (i % 3) for i, n in enumerate(lengths)]
    one = TokenBudgetBatchSampler(lengths, 4, 1024, window=300)
    two = [TokenBudgetBatchSampler(lengths, 4, 1024, window=300, num_replicas=2, rank=r, costs=costs) for r in (0, 1)]
    assert len(one) >= 60 and len(two[0]) >= 30
    timed = lambda steps, a, b: sorted(i for step in steps[a:b] for i in step)  # noqa: E731
    assert timed(list(one), 20, 60) == sorted(timed(list(two[0]), 10, 30) + timed(list(two[1]), 10, 30))


def test_the_report_records_the_nccl_environment_and_the_gpu_topology(tmp_path, monkeypatch):
    monkeypatch.setenv("NCCL_MAX_CTAS", "8")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    assert bench_scaling._environment() == {"NCCL_MAX_CTAS": "8", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    report = {"name": "r", "machine": "2x GPU", "versions": "torch", "command": "python x", "config": "c.yaml",
              "max_steps": 30, "logging_steps": 10, "gpus": 2, "same_data": True,
              "environment": bench_scaling._environment(), "topology": "GPU0 X NV18", "results": []}
    bench_scaling.write(report, str(tmp_path))
    md = (tmp_path / "r.md").read_text()
    assert "- environment: `NCCL_MAX_CTAS=8 TORCH_NCCL_ASYNC_ERROR_HANDLING=1`" in md
    assert "GPU0 X NV18" in md and "one-GPU setups 2x both" in md
    assert json.loads((tmp_path / "r.json").read_text())["environment"]["NCCL_MAX_CTAS"] == "8"


def test_repeats_run_the_setups_round_robin_and_report_medians(tmp_path, monkeypatch):
    speeds = {"single": iter([100.0, 90.0, 110.0]), "fsdp2": iter([180.0, 195.0, 186.0])}
    order = []

    def fake_run(cmd, **kwargs):  # the recipe: a speed per run, from the lists above
        if "--output_dir" not in cmd:
            raise OSError("no nvidia-smi here")  # the report's topology: left out, as on a machine without it
        out = cmd[cmd.index("--output_dir") + 1]
        setup = os.path.basename(out).rsplit("_r", 1)[0]
        order.append(os.path.basename(out))
        os.makedirs(out)
        with open(os.path.join(out, "sft_summary.json"), "w") as f:
            json.dump({"precision": "bf16_master", "throughput": {"tokens_per_second": next(speeds[setup]),
                                                                  "mfu": 0.4, "peak_memory_gib": 9.0}}, f)
        return bench_scaling.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_scaling.subprocess, "run", fake_run)
    assert bench_scaling.main(["--setups", "single,fsdp2", "--repeats", "3", "--out", str(tmp_path)]) == 0
    assert order == ["single_r0", "fsdp2_r0", "single_r1", "fsdp2_r1", "single_r2", "fsdp2_r2"]
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["repeat"] for r in report["results"]] == [0, 0, 1, 1, 2, 2]
    assert [r.get("vs_1gpu") for r in report["results"]] == [None, 1.8, None, 1.95, None, 1.86]  # of the median 100
    assert report["summary"] == [
        {"setup": "single", "runs": 3, "failed": 0, "median_tok_s": 100.0, "min_tok_s": 90.0, "max_tok_s": 110.0},
        {"setup": "fsdp2", "runs": 3, "failed": 0, "median_tok_s": 186.0, "min_tok_s": 180.0, "max_tok_s": 195.0,
         "vs_1gpu": 1.86}]
    md = (tmp_path / "scaling.md").read_text()
    assert "| FSDP2, run 2 | 2 | bf16_master | 195.0 |" in md and "| fsdp2 | 3 | 186.0 | 180.0 - 195.0 | 1.86x |" in md
    assert (tmp_path / "scaling_fsdp2_r2.log").exists()
    with pytest.raises(ValueError, match="--repeats must be at least 1"):
        bench_scaling.main(["--setups", "single", "--repeats", "0", "--out", str(tmp_path)])
