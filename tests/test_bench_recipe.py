"""scripts/bench_recipe.py on the CPU: both sides (stock TRL + LLaVA, recipes/sft.py) on the tiny preset's shapes."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset", "tiny", "--device", "cpu", "--rows", "24", "--warmup", "1", "--steps", "2", "--stock-batch", "2",
         "--workers", "0", "--recipe-args", "--max_length 2048 --per_device_train_batch_size 2"]


def _bench(out, *extra):
    cmd = [sys.executable, "scripts/bench_recipe.py", *SMOKE, "--out", str(out), *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "train_recipe.json").read_text()), res


def test_both_sides_report_speed_in_the_bench_row_shape(tmp_path):
    report, res = _bench(tmp_path)
    assert report["benchmark"] == "train_recipe"
    assert {"machine", "versions", "command", "results", "ratios"} <= set(report)
    assert {"torch", "transformers", "trl", "liger-kernel", "cuda"} <= set(report["versions"])
    rows = {r["side"]: r for r in report["results"]}
    assert set(rows) == {"stock", "ghostvis"}
    for side, row in rows.items():
        assert row["failed"] is None, (side, row["failed"], res.stdout[-3000:])
        assert row["scenario"] == "recipe"
        assert row["tok_s"] > 0 and row["conv_s"] > 0, row
        assert row["steps"] == 2 and row["mfu"] is None and row["peak_mem_gib"] is None  # CPU: no peak FLOP/s, no CUDA
        assert row["settings"], side
    stock = rows["stock"]["settings"]
    assert stock["attn_implementation"] == "sdpa" and stock["max_length"] is None and stock["packing"] is False
    assert stock["activation_checkpointing"] is False and stock["image_tokens_per_image"] == 64  # tiny: 32 px / 4 px
    # the recipe ran on the same conversations, with the warm-up as its excluded first logging interval
    cmd = rows["ghostvis"]["settings"]["command"]
    assert "--num_train_samples 24" in cmd and "--logging_steps 1" in cmd and "--max_steps 3" in cmd
    assert report["ratios"]["conv_s"] > 0
    md = (tmp_path / "train_recipe.md").read_text()
    assert "| stock: TRL SFTTrainer" in md and "## Settings" in md


def test_a_failing_side_is_a_failed_row_and_only_keeps_the_other_sides_earlier_row(tmp_path):
    earlier = {"command": "python scripts/bench_recipe.py --only stock",
               "results": [{"scenario": "recipe", "run": "stock", "side": "stock", "failed": None, "tok_s": 1.0,
                            "conv_s": 1.0, "mfu": None, "peak_mem_gib": None, "settings": {}}]}
    (tmp_path / "train_recipe.json").write_text(json.dumps(earlier))
    # a recipe argument it refuses (the last --recipe-args wins): the ghostvis row fails, the run does not
    report, _ = _bench(tmp_path, "--only", "ghostvis", "--recipe-args", "--no_such_flag 1")
    rows = {r["side"]: r for r in report["results"]}
    assert rows["stock"] == earlier["results"][0]
    assert rows["ghostvis"]["failed"] and rows["ghostvis"]["tok_s"] is None
    assert report["ratios"] == {} and "earlier row: python scripts/bench_recipe.py --only stock" in report["command"]


def test_stock_falls_back_to_checkpointing_when_out_of_memory(monkeypatch):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_recipe", os.path.join(ROOT, "scripts", "bench_recipe.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []

    def attempt(args, dataset, liger, checkpointing, out_dir):
        calls.append(checkpointing)
        if not checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return {"settings": {}}

    monkeypatch.setattr(bench, "_stock_attempt", attempt)
    row = bench.run_stock(bench._parser().parse_args(["--device", "cpu", "--stock-batch", "4"]), dataset=None)
    assert calls == [False, True]
    assert any(n.startswith("out of memory without activation checkpointing") for n in row["settings"]["notes"])


def test_stock_keeps_its_best_batch_size_and_records_the_sweep(monkeypatch):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_recipe", os.path.join(ROOT, "scripts", "bench_recipe.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rates = {4: 10.0, 8: 14.0}  # 16 does not fit even with checkpointing

    def attempt(args, dataset, liger, checkpointing, out_dir):
        if args.stock_batch not in rates:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"conv_s": rates[args.stock_batch], "tok_s": 100 * rates[args.stock_batch], "mfu": 0.1,
                "peak_mem_gib": 2.0 * args.stock_batch, "settings": {"per_device_train_batch_size": args.stock_batch,
                                                                     "activation_checkpointing": checkpointing}}

    monkeypatch.setattr(bench, "_stock_attempt", attempt)
    args = bench._parser().parse_args(["--device", "cpu"])
    assert args.stock_batch == [4, 8, 16]
    row = bench.run_stock(args, dataset=None)
    assert row["conv_s"] == 14.0 and row["settings"]["per_device_train_batch_size"] == 8
    sweep = row["settings"]["batch_sweep"]
    assert [s["batch"] for s in sweep] == [4, 8, 16] and sweep[1]["conv_s"] == 14.0
    assert "out of memory" in sweep[2]["failed"]
    monkeypatch.setattr(bench, "_stock_attempt", lambda *a: (_ for _ in ()).throw(ValueError("broken")))
    with pytest.raises(ValueError, match="broken"):  # no size ran: the side fails with the last error
        bench.run_stock(args, dataset=None)
