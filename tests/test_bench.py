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


def test_bench_unknown_benchmark_is_refused(capsys):
    assert bench_main(["nope"]) == 2
    assert "usage: ghostvis bench" in capsys.readouterr().err


def test_ghostvis_help_lists_every_benchmark(capsys):
    from ghostvis_hf.bench import BENCHMARKS
    from ghostvis_hf.cli import main as cli_main

    assert cli_main(["--help"]) == 0
    bench_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("bench "))
    assert all(name in bench_line for name in BENCHMARKS) and "quantize" in bench_line
