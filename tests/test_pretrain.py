"""`recipes/pretrain.py` (text-only continued pretraining of the decoder, packed plain text) and the set-up every
recipe start shares: CPU threads, and no bitsandbytes noise."""

import json
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_text(path, n_lines=300, seed=0):
    # A tiny regular language: quickly learnable, so the loss must fall within a few dozen steps.
    rng = random.Random(seed)
    colors, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    lines = [f"the {rng.choice(colors)} {rng.choice(shapes)} is next to the {rng.choice(colors)} "
             f"{rng.choice(shapes)} ." for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _run(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_pretrain_loss_falls_and_sft_starts_from_its_output(tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file

    text = _write_text(tmp_path / "corpus.txt")
    out = tmp_path / "pretrain"
    res = _run(["recipes/pretrain.py", "--model_name_or_path", tiny_checkpoint, "--dataset_name", text,
                "--text_sample_by", "line", "--max_length", "64", "--per_device_train_batch_size", "8",
                "--max_steps", "30", "--logging_steps", "1", "--learning_rate", "3e-3", "--warmup_steps", "0",
                "--output_dir", str(out), "--plot", "false", "--cpu_threads", "1", "--profile_steps", "5:7"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gemm_4bit_forward" not in res.stderr
    assert (out / "profile_rank0.txt").stat().st_size > 0  # --profile_steps reaches the trainer here too
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["steps"] == 30 and summary["data"]["rows"] == 300
    assert summary["loss_last"] < 0.6 * summary["loss_first"], summary
    assert 0 < summary["parameters"]["trainable"] and summary["parameters"]["frozen"] > 0

    before, after = load_file(os.path.join(tiny_checkpoint, "model.safetensors")), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name, value in before.items():  # only the decoder and its head trained
        same = torch.equal(value, after[name])
        assert same == ("language_model" not in name and "lm_head" not in name), name
    card = (out / "README.md").read_text()
    assert "`recipes/pretrain.py`" in card and "corpus.txt" in card and "shapes" not in card.split("## Use")[0]

    sft = tmp_path / "sft"
    res = _run(["recipes/sft.py", "--model_name_or_path", str(out), "--max_steps", "1", "--num_train_samples", "16",
                "--per_device_train_batch_size", "4", "--eval_after_training", "false", "--plot", "false",
                "--save_strategy", "no", "--output_dir", str(sft), "--cpu_threads", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((sft / "sft_summary.json").read_text())["steps"] == 1


def test_pretrain_refuses_options_it_does_not_implement_before_loading_anything(tmp_path):
    out = tmp_path / "o"
    res = _run(["recipes/pretrain.py", "--bad_rows", "error", "--loss", "trl", "--max_steps", "1",
                "--output_dir", str(out), "--cpu_threads", "1"])
    assert res.returncode != 0
    assert "recipes/pretrain.py does not implement --bad_rows, --loss" in res.stderr
    assert not out.exists()


def test_step_callbacks_follow_the_arguments():
    from ghostvis_hf.training import GhostVisArguments, step_callbacks
    from ghostvis_hf.training.garbage_collection import GarbageCollectionCallback
    from ghostvis_hf.training.profiling import ProfilerCallback

    assert step_callbacks(GhostVisArguments(gc_every_steps=0), "out") == []  # nothing asked for
    assert [type(c) for c in step_callbacks(GhostVisArguments(), "out")] == [GarbageCollectionCallback]  # default
    callbacks = step_callbacks(GhostVisArguments(profile_steps="2:4", gc_every_steps=5), "out")
    assert [type(c) for c in callbacks] == [ProfilerCallback, GarbageCollectionCallback]


def test_pretrain_refuses_a_file_without_text(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"content": "no text column"}) + "\n")
    res = _run(["recipes/pretrain.py", "--dataset_name", str(bad), "--max_steps", "1", "--output_dir",
                str(tmp_path / "o"), "--cpu_threads", "1"])
    assert res.returncode != 0 and "--dataset_text_field" in res.stderr


# ---------------------------------------------------------------- what every recipe start shares


def test_cpu_threads_default_does_not_oversubscribe_a_shared_cpu(monkeypatch):
    from ghostvis_hf.training.runtime import resolve_cpu_threads

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_cpu_threads(None, cores=2, load=0.0) == 2  # idle machine: every core
    assert resolve_cpu_threads(None, cores=2, load=1.2) == 1  # another busy process: the free core only
    assert resolve_cpu_threads(None, cores=2, load=7.0) == 1  # never below one
    assert resolve_cpu_threads(None, cores=16, load=3.6) == 12
    assert resolve_cpu_threads(None, cores=16, load=0.0, local_processes=4) == 4  # shared among this host's ranks
    assert resolve_cpu_threads(0, cores=16, load=15.0) == 16  # 0: every usable core, whatever else runs
    assert resolve_cpu_threads(3, cores=2, load=9.0) == 3  # a number: exactly that
    with pytest.raises(ValueError, match="cpu_threads"):
        resolve_cpu_threads(-1)


def test_set_cpu_threads_applies_the_resolved_default(monkeypatch):
    import torch

    from ghostvis_hf.training import GhostVisArguments, runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.1, 1.0, 1.0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    previous = torch.get_num_threads()
    try:
        assert runtime.set_cpu_threads(GhostVisArguments()) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def test_nccl_max_ctas_reaches_the_environment_unless_it_already_says_otherwise(monkeypatch):
    from ghostvis_hf.training import GhostVisArguments, set_nccl_max_ctas

    monkeypatch.delenv("NCCL_MAX_CTAS", raising=False)
    assert set_nccl_max_ctas(GhostVisArguments()) is None and "NCCL_MAX_CTAS" not in os.environ  # unset: NCCL's own
    assert set_nccl_max_ctas(GhostVisArguments(nccl_max_ctas=8)) == "8" == os.environ["NCCL_MAX_CTAS"]
    monkeypatch.setenv("NCCL_MAX_CTAS", "4")
    assert set_nccl_max_ctas(GhostVisArguments(nccl_max_ctas=8)) == "4" == os.environ["NCCL_MAX_CTAS"]  # env wins
    for bad in (0, 65):
        with pytest.raises(ValueError, match="nccl_max_ctas must be in"):
            GhostVisArguments(nccl_max_ctas=bad)


def test_usable_cores_respects_the_affinity_mask():
    from ghostvis_hf.training.runtime import usable_cores

    if hasattr(os, "sched_getaffinity"):
        assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("script", ["recipes/sft.py", "recipes/pretrain.py"])
def test_recipe_start_prints_no_bitsandbytes_kernels_warning(script):
    # Importing a recipe module is its start up to main(): TRL -> peft -> bitsandbytes, which warned on every start.
    code = ("import importlib.util, sys; sys.argv = ['x']; "
            f"spec = importlib.util.spec_from_file_location('recipe', {script!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "import ghostvis_hf.training, peft, trl; print('imported', 'bitsandbytes' in sys.modules)")
    res = _run(["-c", code], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "imported True" in res.stdout  # bitsandbytes was imported, and
    assert "gemm_4bit_forward" not in res.stderr and "kernels" not in res.stderr  # said nothing


def test_other_bitsandbytes_warnings_still_show(caplog):
    import logging

    from ghostvis_hf.quantization import BNB_CPU_LOGGER, quiet_bitsandbytes_cpu_kernel_warning

    quiet_bitsandbytes_cpu_kernel_warning()
    bnb = logging.getLogger(BNB_CPU_LOGGER)
    missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", missing)
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...",
                    OSError("hub offline"))
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load CPU gemm_4bit_forward from kernels-community: hub offline. Please ..."]
