"""The recipes as users launch them: YAML configs, unknown keys, freezing, bad rows, resume after SIGKILL, ZeRO-2."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset

from conftest import make_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and fast: a few steps on a few rows of the built-in data.
FAST = ["--num_train_samples", "64", "--num_eval_samples", "16", "--per_device_train_batch_size", "8",
        "--logging_steps", "1", "--plot", "false", "--dataloader_num_workers", "0"]


def _main_job_overrides():
    from ghostvis_hf.training.model import GhostVisArguments, _glue_overrides
    from trl import TrlParser

    (gv,) = TrlParser((GhostVisArguments,)).parse_yaml_file(os.path.join(ROOT, "recipes/configs/sft_tiny.yaml"),
                                                           allow_extra_keys=True)
    return _glue_overrides(gv)


def _run(args, timeout=600, launcher=None):
    cmd = [sys.executable, *args] if launcher is None else [*launcher, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_sft_recipe_trains_saves_loads_and_evaluates(tmp_path):
    out = tmp_path / "sft"
    res = _run(["recipes/sft.py", "--max_steps", "3", "--output_dir", str(out), "--save_strategy", "no", *FAST,
                "--eval_strategy", "steps", "--eval_steps", "2"])  # + the held-out loss during training
    assert res.returncode == 0, res.stderr[-3000:]
    assert "colour+shape held-out accuracy" in res.stdout
    assert "held-out rows for the loss during training: 16" in res.stderr
    assert "'eval_loss'" in res.stdout + res.stderr
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval"]["n"] == 16
    assert (out / "eval_shapes" / "predictions.jsonl").exists()
    for f in ("model.safetensors", "modeling_ghostvis.py", "processor_config.json", "README.md"):
        assert (out / f).exists(), f


def test_loss_during_training_needs_held_out_rows():
    """`--eval_strategy steps` on a run that holds no rows out is refused before training, naming the ways to hold
    some out; without it nothing is evaluated during training."""
    from types import SimpleNamespace

    from ghostvis_hf.training import GhostVisArguments, held_out_for_loss

    args = SimpleNamespace(eval_strategy="steps", max_length=256)
    with pytest.raises(ValueError, match="--eval_strategy steps .* holds none out: pass --eval_dataset_name"):
        held_out_for_loss(None, None, args, GhostVisArguments())
    assert held_out_for_loss(None, None, SimpleNamespace(eval_strategy="no"), GhostVisArguments()) is None


def test_unknown_yaml_key_fails_loudly(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("preset: tiny\nbf16: false\nlearning_rat: 0.1\noutput_dir: x\n")
    res = _run(["recipes/sft.py", "--config", str(cfg)])
    assert res.returncode != 0 and "learning_rat" in res.stderr


def test_command_line_overrides_yaml():
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    try:
        import sft
    finally:
        sys.path.pop(0)
    script, training, model, gv = sft.make_parser().parse_args_and_config(
        ["--config", sft.DEFAULT_CONFIG, "--learning_rate", "0.5"])
    assert training.learning_rate == 0.5  # command line beats YAML
    assert training.per_device_train_batch_size == 32  # YAML beats the dataclass default (8)
    assert gv.preset == "tiny"


def test_align_recipe_trains_only_the_glue(tmp_path):
    out = tmp_path / "align"
    res = _run(["recipes/align.py", "--max_steps", "2", "--output_dir", str(out), *FAST, "--cpu_threads", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CPU threads: 1 (cpu_threads of" in res.stderr  # the recipe start sft and pretrain share
    summary = json.loads((out / "align_summary.json").read_text())
    counts = summary["parameters"]
    assert 0 < counts["trainable"] < counts["frozen"]
    assert "trainable parameters:" in res.stdout

    import torch
    from safetensors.torch import load_file

    import ghostvis_hf

    torch.manual_seed(0)
    start, _ = ghostvis_hf.create("tiny")
    after = load_file(out / "model.safetensors")
    for name, param in start.state_dict().items():
        if name not in after:
            continue  # tied lm_head
        same = torch.equal(param, after[name])
        glue = name.startswith(("model.resampler", "model.multi_modal_projector"))
        assert same != glue, name


def test_bad_rows_skipped_with_report_or_refused(tiny):
    from ghostvis_hf.data.validate import validate_rows

    _, processor = tiny
    good = {"images": [make_image()], "messages": [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    two_markers = {"images": [make_image()], "messages": [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                     {"type": "text", "text": "Compare"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "same"}]}]}
    long_prefix = {"images": [make_image()], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "word " * 80}, {"type": "image", "text": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}
    rows = [good, two_markers, long_prefix, good]
    ds = Dataset.from_list([{"images": [{"bytes": _png()}], "messages": r["messages"]} for r in rows])
    ds = ds.cast_column("images", ds.features["images"])
    clean, report = validate_rows(ds, processor, max_length=64, policy="skip")
    assert len(clean) == 2
    assert report["skipped"] == {"image_count_mismatch": 1, "image_cut_by_truncation": 1}
    with pytest.raises(ValueError, match="Bad training row 1 \\(image_count_mismatch\\)"):
        validate_rows(ds, processor, max_length=64, policy="error")
    # Rows are checked in batches: indices and the kept rows must not depend on where a batch ends.
    clean, report = validate_rows(ds, processor, max_length=64, policy="skip", batch_size=3)
    assert report["skipped"] == {"image_count_mismatch": 1, "image_cut_by_truncation": 1}
    assert [r["messages"] for r in clean] == [good["messages"], good["messages"]]
    with pytest.raises(ValueError, match="Bad training row 2 \\(image_cut_by_truncation\\)"):
        validate_rows(ds.select([0, 0, 2]), processor, max_length=64, policy="error", batch_size=2)
    unreadable = Dataset.from_list([{"images": [b"not an image"], "messages": good["messages"]}])
    clean, report = validate_rows(unreadable, processor, policy="skip")
    assert len(clean) == 0 and report["skipped"] == {"unreadable_image": 1}


def _png():
    import io

    buf = io.BytesIO()
    make_image().save(buf, format="PNG")
    return buf.getvalue()


def test_resume_after_sigkill_finishes_at_the_same_step(tmp_path):
    out = tmp_path / "resume"
    args = ["recipes/sft.py", "--max_steps", "12", "--save_steps", "4", "--save_strategy", "steps",
            "--output_dir", str(out), "--eval_after_training", "false", *FAST]
    # The run is paused right after its first checkpoint (a test-only wrapper around the recipe), so the SIGKILL
    # always lands mid-run however fast the machine is.
    pause_after_first_checkpoint = (
        "import runpy, sys, time, transformers\n"
        "orig = transformers.Trainer._save_checkpoint\n"
        "def save_then_pause(self, *a, **k):\n"
        "    orig(self, *a, **k)\n"
        "    time.sleep(600)\n"
        "transformers.Trainer._save_checkpoint = save_then_pause\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", pause_after_first_checkpoint, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    try:
        while not (out / "checkpoint-4" / "trainer_state.json").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        time.sleep(0.5)  # trainer_state.json is written last; let it finish
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "model.safetensors").exists()  # killed before the end
    res = _run([*args, "--resume_from_checkpoint", str(out / "checkpoint-4")])
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads(max((out).glob("checkpoint-*/trainer_state.json"),
                           key=lambda p: int(p.parent.name.split("-")[1])).read_text())
    assert state["global_step"] == 12
    assert json.loads((out / "sft_summary.json").read_text())["steps"] == 12


# ZeRO-3 in bf16: the whole model must be built inside one zero.Init (the glue once stayed fp32 while the towers were
# partitioned in bf16, and ZeRO-3 refused the mixed-dtype parameter group; seen on an H100 first).
@pytest.mark.parametrize("stage,precision", [("zero2", None), ("zero3", "bf16")])
def test_deepspeed_launch_on_one_cpu_process(tmp_path, stage, precision):
    pytest.importorskip("deepspeed")
    out = tmp_path / stage
    # ZeRO-2's settings live in its DeepSpeed JSON (precision "auto": from --bf16), so no --mixed_precision there
    mixed = [] if precision is None else ["--mixed_precision", precision]
    res = _run(["--config_file", f"accelerate_configs/deepspeed_{stage}.yaml", "--num_processes", "1",
                *mixed, "recipes/sft.py", "--max_steps", "2", "--use_cpu", "true",
                "--bf16", str(precision == "bf16").lower(),
                "--save_strategy", "no", "--output_dir", str(out), "--eval_after_training", "false", *FAST],
               launcher=[sys.executable, "-m", "accelerate.commands.launch"], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "sft_summary.json").read_text())["steps"] == 2
    if stage == "zero3":  # the sharded parameters were gathered into a complete checkpoint
        from safetensors.torch import load_file

        import ghostvis_hf
        reference, _ = ghostvis_hf.create("tiny", **_main_job_overrides())
        saved = load_file(out / "model.safetensors")
        shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k != "lm_head.weight"}
        assert {k: tuple(v.shape) for k, v in saved.items()} == shapes


def test_sft_recipe_uses_the_per_group_learning_rates(tmp_path):
    res = _run(["recipes/sft.py", "--max_steps", "1", "--output_dir", str(tmp_path / "lr"), "--save_strategy", "no",
                "--eval_after_training", "false", "--vision_tower_lr", "3e-3", "--projector_lr", "2e-3", *FAST])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "optimizer learning rates: {'vision': 0.003, 'glue': 0.002, 'text': 0.001}" in res.stderr


def test_make_optimizer_groups():
    from types import SimpleNamespace

    import ghostvis_hf
    from ghostvis_hf.training import GhostVisArguments, make_optimizer

    model, _ = ghostvis_hf.create("tiny")
    targs = SimpleNamespace(learning_rate=1e-3, weight_decay=0.1, optim="adamw_torch", adam_beta1=0.9,
                            adam_beta2=0.999, adam_epsilon=1e-8)
    assert make_optimizer(model, targs, GhostVisArguments()) is None  # the trainer's own optimizer
    opt = make_optimizer(model, targs, GhostVisArguments(vision_tower_lr=3e-3, projector_lr=2e-3))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.model.vision_tower.embeddings.patch_embedding.weight)] == 3e-3
    assert lr_of[id(model.model.multi_modal_projector.linear_1.weight)] == 2e-3
    assert lr_of[id(model.lm_head.weight)] == 1e-3
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if any(p.ndim < 2 for p in g["params"]))


def test_two_node_config_is_the_one_node_fsdp2_config_for_two_hosts():
    """The multi-node file (untestable here) must stay what the tested one-node FSDP2 file is, for two hosts."""
    from accelerate.commands.config.config_args import load_config_from_file

    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "accelerate_configs")
    one, two = (load_config_from_file(os.path.join(root, f)) for f in ("fsdp2.yaml", "fsdp2_2nodes.yaml"))
    assert two.num_machines == 2 and two.num_processes % two.num_machines == 0 and two.rdzv_backend == "c10d"
    assert two.fsdp_config == one.fsdp_config and two.mixed_precision == one.mixed_precision
    assert two.distributed_type == one.distributed_type


@pytest.mark.parametrize("config", sorted(f for f in os.listdir(os.path.join(ROOT, "recipes", "configs"))
                                          if f.startswith(("sft_", "align_"))))
def test_every_sft_and_align_config_parses(config):
    """The GPU configs only run on GPUs: a misspelt key or value must still fail here, not on the machine."""
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    try:
        import sft
    finally:
        sys.path.pop(0)
    script, training, model, gv = sft.make_parser().parse_args_and_config(
        ["--config", os.path.join(ROOT, "recipes", "configs", config), "--output_dir", "unused",
         "--use_cpu", "true"])  # bf16 GPU configs parse on a CPU machine too
    assert training.max_length and gv.preset in ("tiny", "small", "1.5b", "7b")


def test_a_preset_is_created_in_the_dtype_asked_for():
    from types import SimpleNamespace

    from ghostvis_hf.training import GhostVisArguments
    from ghostvis_hf.training.model import load_model_and_processor

    model_args = SimpleNamespace(dtype="bfloat16", model_name_or_path=None, attn_implementation=None,
                                 load_in_4bit=False, load_in_8bit=False, use_peft=False)
    model, _ = load_model_and_processor(GhostVisArguments(preset="tiny"), model_args, SimpleNamespace(seed=0))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_presets_are_initialised_where_the_process_trains(monkeypatch):
    """A 7b preset took minutes to initialise on the CPU: single-GPU / DDP processes make it on their own GPU;
    CPU runs and the sharding launchers (which place the weights themselves) keep the CPU."""
    from types import SimpleNamespace

    import torch

    from ghostvis_hf.training.model import init_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init_device(SimpleNamespace(use_cpu=False)) == torch.device("cuda", 1)
    assert init_device(SimpleNamespace(use_cpu=True)) is None
    for launcher in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU"):
        monkeypatch.setenv(launcher, "true")
        assert init_device(SimpleNamespace(use_cpu=False)) is None
        monkeypatch.delenv(launcher)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert init_device(SimpleNamespace(use_cpu=False)) is None


def test_compile_layers_is_refused_under_zero3_and_said_to_do_nothing_on_the_cpu(monkeypatch, caplog):
    import logging

    import torch

    import ghostvis_hf
    from ghostvis_hf.training import GhostVisArguments, apply_gpu_speedups

    model, _ = ghostvis_hf.create("tiny")
    args = GhostVisArguments(compile_layers=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="ghostvis"):
        assert apply_gpu_speedups(model, args) is None
    assert "layers run uncompiled" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="ZeRO-3"):
        apply_gpu_speedups(model, args)


@pytest.mark.parametrize("window", ["30", "a:b", "5:5", "-1:3", "1:2:3"])
def test_a_malformed_profile_window_is_refused_before_anything_loads(window):
    from ghostvis_hf.training import GhostVisArguments

    with pytest.raises(ValueError, match="profile_steps"):
        GhostVisArguments(profile_steps=window)


def test_recompute_mlp_asks_for_the_recomputing_mlp_swap(monkeypatch):
    import torch

    import ghostvis_hf
    from ghostvis_hf import kernels
    from ghostvis_hf.kernels import ACTIVE
    from ghostvis_hf.kernels import liger as _liger
    from ghostvis_hf.training import GhostVisArguments, apply_gpu_speedups

    model, _ = ghostvis_hf.create("tiny")
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "liger_available", lambda: True)
    for name in ("patch_rms_norm", "patch_swiglu", "patch_rope"):
        monkeypatch.setattr(_liger, name, lambda m, _n=name, **kw: calls.append((_n, kw)))
    try:
        for flag, want in ((True, {"recompute": True}), (False, {"recompute": False})):
            calls.clear()
            active = apply_gpu_speedups(model, GhostVisArguments(recompute_mlp=flag))
            assert ("patch_swiglu", want) in calls
            assert active["swiglu"] == ("liger+recompute" if flag else "liger")
    finally:
        ACTIVE.clear()
        kernels.reset_kernels(model)
