"""CPU smoke tests of the GPU benchmarks: they run end to end on the tiny preset and write what they measured."""

import json

import pytest

from ghostvis_hf.bench import main as bench_main


def test_bench_quantize_on_cpu_measures_unquantized_and_int8_and_reports_why_bnb_cannot_run(tmp_path):
    pytest.importorskip("torchao")
    rc = bench_main(["quantize", "--preset", "tiny", "--device", "cpu", "--modes", "none,int8,bnb-int8",
                     "--prompt-len", "16", "--new-tokens", "4", "--out-dir", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / "quantize.json").read_text())
    none, int8 = out["results"]
    assert none["mode"] == "none" and none["footprint_gb"] > 0 and none["stock_tok_s"] > 0 and none["engine_tok_s"] > 0
    assert none["engine_greedy_equals_stock"] is True  # fp32 on the CPU: the engine decodes exactly like generate
    assert int8["mode"] == "int8" and int8["engine_greedy_equals_stock"] is True  # on the same int8 weights
    assert int8["footprint_gb"] < none["footprint_gb"] and int8["logits_cosine"] > 0.99
    assert "needs a CUDA GPU" in out["errors"]["bnb-int8"]
    table = (tmp_path / "quantize.md").read_text()
    assert "| none |" in table and "| int8 |" in table
    assert "bnb-int8: `RuntimeError: --quantize bnb-int8 needs a CUDA GPU" in table


def test_bench_generate_int8_rows_next_to_the_unquantized_ones(tmp_path):
    pytest.importorskip("torchao")
    rc = bench_main(["generate", "--preset", "tiny", "--device", "cpu", "--modes", "eager", "--batch-sizes", "1,2",
                     "--prompt-len", "40", "--new-tokens", "8", "--quantize", "int8", "--out-dir", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / "generate.json").read_text())
    assert out["benchmark"] == "generate" and not out["errors"]
    rows = {(r["mode"], r["batch"]): r for r in out["results"]}
    modes = ("stock", "stock-static", "eager")
    assert set(rows) == {(m + q, b) for m in modes for q in ("", "-int8") for b in (1, 2)}
    assert rows[("stock-static", 2)]["greedy_vs_stock"]["identical_rows"] == 2  # transformers' static-cache path
    assert all(r["tok_s"] > 0 and "pct_roofline" in r for r in rows.values())
    assert rows[("eager-int8", 2)]["greedy_vs_stock"]["identical_rows"] == 2  # engine == generate on the int8 model
    order = [r["mode"] for r in out["results"]]  # the int8 engine rows before the slow int8 stock ones
    assert order.index("eager-int8") < order.index("stock-int8") and order.index("stock") < order.index("eager")
    assert 0.3 < out["int8"]["weight_ratio"] < 0.6 and out["int8"]["weight_bytes"] < out["weight_bytes"]
    table = (tmp_path / "generate.md").read_text()
    speedups = next(line for line in table.splitlines() if line.startswith("int8 / unquantized tok/s: "))
    assert "| eager-int8 | 1 |" in table and "stock batch 1 " in speedups and "eager batch 2 " in speedups


def test_bench_generate_on_a_short_context_measures_time_to_first_token_and_says_which_modes_did_not_run(tmp_path):
    from ghostvis_hf import create
    from ghostvis_hf.bench.generate import ttft_prompt_tokens

    model, processor = create("tiny")
    assert ttft_prompt_tokens(model, processor) + 1 > 8 + 4  # the image prompt does not fit the decode context
    rc = bench_main(["generate", "--preset", "tiny", "--device", "cpu", "--modes", "eager,fused", "--batch-sizes",
                     "1", "--prompt-len", "8", "--new-tokens", "4", "--no-stock", "--ttft-repeats", "1",
                     "--out-dir", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / "generate.json").read_text())
    assert not out["errors"], out["errors"]
    assert out["ttft"]["engine_mode"] == "eager" and out["ttft"]["engine_new_image_s"] > 0
    assert [(r["mode"], r["batch"]) for r in out["results"]] == [("eager", 1)]
    assert out["not_run"] == {"fused": "needs a CUDA GPU (Triton kernels in CUDA graphs)"}  # said, not dropped
    assert "Not run:\n- fused: needs a CUDA GPU" in (tmp_path / "generate.md").read_text()


def test_bench_unknown_benchmark_is_refused(capsys):
    assert bench_main(["nope"]) == 2
    assert "usage: ghostvis bench" in capsys.readouterr().err


def test_ghostvis_help_lists_every_benchmark(capsys):
    from ghostvis_hf.bench import BENCHMARKS
    from ghostvis_hf.cli import main as cli_main

    assert cli_main(["--help"]) == 0
    bench_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("bench "))
    assert all(name in bench_line for name in BENCHMARKS) and "quantize" in bench_line


def test_bench_train_rows_keep_their_shape_on_the_cpu(tmp_path):
    """`bench train` on the CPU (tiny preset): every row in the recorded shape (scenario, run, tok_s, mfu,
    peak_mem_gib, gpus), the master-weight run included, and a kernel profile written for the run asked for."""
    rc = bench_main(["train", "--preset", "tiny", "--device", "cpu", "--batch", "1", "--seq", "128", "--steps", "1",
                     "--warmup", "1", "--scenarios", "fixed", "--runs", "stock,swaps,master", "--profile", "master",
                     "--out-dir", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / "train.json").read_text())
    rows = {r["run"]: r for r in out["results"]}
    assert len(rows) == 3 and all(r["failed"] is None for r in rows.values())
    for r in rows.values():
        assert {"scenario", "run", "tok_s", "mfu", "peak_mem_gib", "gpus"} <= set(r) and r["tok_s"] > 0
        assert r["gpus"] == 1 and r["scenario"] == "fixed"
    assert (tmp_path / "train_profile_master.txt").read_text().startswith("1 steps: wall")


def test_bench_generate_records_the_autotuned_kernel_configs(monkeypatch):
    """What the autotuner chose (per product of the fused step) is readable from the record and its table."""
    triton = pytest.importorskip("triton")
    from ghostvis_hf.bench.generate import markdown
    from ghostvis_hf.inference import triton_decode as td

    class Tuned:  # an autotuner after warm-up: its cache maps each key (shape, flags, dtypes) to the chosen config
        def __init__(self, cache):
            self.cache = cache

    monkeypatch.setattr(td, "_linear_gemv", Tuned({(1, 8960, 1536, True, True, True, "torch.bfloat16"):
                                                   triton.Config({"BLOCK_N": 4, "BLOCK_K": 512}, num_warps=4,
                                                                 num_stages=3)}))
    monkeypatch.setattr(td, "_linear_dot", Tuned({(32, 1536, 8960, False, False, True, "torch.bfloat16"):
                                                  triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 8},
                                                                num_warps=4, num_stages=4)}))
    configs = td.tuned_configs()
    assert configs["one_row"] == {"M=1 N=8960 K=1536 NORM SWIGLU INT8": {
        "BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "num_ctas": 1, "num_stages": 3}}
    assert configs["several_rows"]["M=32 N=1536 K=8960 INT8"]["SPLIT_K"] == 8
    out = {"benchmark": "generate", "command": "x", "machine": "m", "versions": {}, "preset": "1.5b",
           "dtype": "bfloat16", "prompt_len": 128, "new_tokens": 256, "results": [], "errors": {},
           "kernel_configs": {"fused-int8": configs}}
    table = markdown(out)
    assert "Autotuned kernel configs after `fused-int8`'s warm-up" in table
    assert "- M=32 N=1536 K=8960 INT8 -> BLOCK_N 32, BLOCK_K 128, SPLIT_K 8, num_warps 4" in table
