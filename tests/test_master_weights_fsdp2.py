"""bf16 + fp32 master weights under FSDP2 (issue 17): two CPU processes (gloo) shard a small model with `fully_shard`
after the optimizer exists and swap its parameters for the shards, as accelerate's FSDP2 `prepare` does. The sharded
run must train as the unsharded one does, and its optimizer state must go through torch.distributed.checkpoint's
full state dict (what the Trainer saves under FSDP2) and resume exactly."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

_WORKER = r'''
import copy, json, sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

from ghostvis_hf.training.optimizer import MasterWeightOptimizer

kernel, device = sys.argv[2], sys.argv[3]  # "torch" | "triton" (the fused AdamW kernel; the CPU runs Triton's
# interpreter), "cpu" (gloo) | "cuda" (NCCL, one GPU per rank)
dist.init_process_group("nccl" if device == "cuda" else "gloo")
rank = dist.get_rank()
if device == "cuda":
    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
torch.manual_seed(0)


def build():
    torch.manual_seed(0)  # 33 output rows: the shards of the first layer are uneven (17 + 16)
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.GELU(), torch.nn.Linear(33, 8),
                               torch.nn.LayerNorm(8)).to(device)


def groups(model):
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def sharded(model, lazy=True):
    opt = MasterWeightOptimizer(groups(model), param_dtype=torch.bfloat16, lazy=lazy, kernel=kernel, lr=1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    old = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    new = dict(model.named_parameters())
    for group, group_names in zip(opt.param_groups, old):  # accelerate's fsdp2_switch_optimizer_parameters
        group["params"] = [new[n] for n in group_names]
    return opt


batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)).to(device) for i in range(12)]  # same on both


def step(model, opt, x):
    loss = model(x.to(torch.bfloat16)).float().pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).float()


# the reference: one process, no sharding, masters made from the bf16-rounded weights as the sharded run's are
ref = build().to(torch.bfloat16)
ref_opt = MasterWeightOptimizer(groups(ref), kernel=kernel, lr=1e-2)
model = build()
opt = sharded(model)
start = [full(p).clone() for p in model.parameters()]
for x in batches[:6]:
    step(ref, ref_opt, x)
    step(model, opt, x)
report = {"local_shapes": [list(m.to_local().shape) for m in opt.master_weights],
          "master_types": sorted({type(m).__name__ for m in opt.master_weights}),
          "moved": sum((full(p) - s).abs().sum().item() for p, s in zip(model.parameters(), start)),
          "master_vs_ref": max((full(m) - r).abs().max().item()
                               for m, r in zip(opt.master_weights, ref_opt.master_weights)),
          "params_equal_ref": all(torch.equal(full(p), r.float()) for p, r in zip(opt._params, ref_opt._params)),
          "params_are_bf16": all(p.dtype == torch.bfloat16 for p in model.parameters())}
steps_before = [float(s["step"]) for s in opt.state.values()]
options = StateDictOptions(full_state_dict=True, cpu_offload=True)
osd = get_optimizer_state_dict(model, opt, options=options)
msd = get_model_state_dict(model, options=options)
osd, msd = copy.deepcopy(osd), copy.deepcopy(msd)  # as saved to disk: the live step counters must not leak in
report["steps_untouched_by_saving"] = [float(s["step"]) for s in opt.state.values()] == steps_before == [6.0] * 6
if rank == 0:
    report["saved"] = {k: {n: [list(v.shape), str(v.dtype)] for n, v in s.items() if n != "step"}
                       for k, s in osd["state"].items()}
for x in batches[6:]:
    step(model, opt, x)

fresh = build()  # a restarted process: other initial weights would not matter, they are overwritten
fresh_opt = sharded(fresh)
load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
set_model_state_dict(fresh, msd, options=load)
set_optimizer_state_dict(fresh, fresh_opt, osd, options=load)
for x in batches[6:]:
    step(fresh, fresh_opt, x)
report["resumed_equal"] = all(torch.equal(full(a), full(b)) for a, b in zip(model.parameters(), fresh.parameters()))
report["resumed_masters_equal"] = all(torch.equal(full(a), full(b))
                                      for a, b in zip(opt.master_weights, fresh_opt.master_weights))
try:
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])[::-1]  # swapped after stepping: refused
    opt.step()
    report["refused_swap"] = False
except RuntimeError as e:
    report["refused_swap"] = "replaced after the optimizer stepped" in str(e)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
'''


def _launch(tmp_path, kernel, device):
    """Runs the worker on two ranks; returns both reports. A run that dies in native code (std::terminate: SIGABRT,
    "terminate called without an active exception", seen once in CI in rank 0 of the interpreter run and not
    reproduced in over 100 local runs, some under CPU load) is run once more in a fresh directory, its output kept
    as a warning: such an abort is the process, not the numbers under test; a Python error or a wrong number is
    never retried. The faulthandler prints every thread's Python stack if it happens again."""
    interpret = kernel == "triton" and device == "cpu"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           **({"TRITON_INTERPRET": "1"} if interpret else {})}
    for attempt in (1, 2):
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        script = out / "worker.py"
        script.write_text(_WORKER)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                   str(out), kernel, device]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        aborted = run.returncode != 0 and ("SIGABRT" in run.stderr or "terminate called" in run.stderr)
        if not aborted or attempt == 2:
            break
        warnings.warn(f"worker aborted in native code; running it once more:\n{run.stderr[-6000:]}")
    assert run.returncode == 0, run.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_fsdp2_shards_train_like_one_process_and_resume_through_dcp(tmp_path, kernel):
    if kernel == "triton":
        pytest.importorskip("triton")
    _check(_launch(tmp_path, kernel, "cpu"), exact_resume=kernel == "torch")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_fsdp2_on_two_gpus(tmp_path, kernel):
    """The same on two GPUs over NCCL; the CUDA kernel rounds as torch does, so both paths resume bit-identically."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    _check(_launch(tmp_path, kernel, "cuda"), exact_resume=True)


def _check(reports, exact_resume):
    for rank, report in enumerate(reports):
        assert report["master_types"] == ["DTensor"]  # fp32 shards, not full copies
        assert report["local_shapes"][0] == [17 - rank, 16]  # this rank's rows of the 33 x 16 weight
        assert report["moved"] > 0.1  # it trained
        assert report["master_vs_ref"] < 1e-5, report["master_vs_ref"]
        assert report["params_equal_ref"] and report["params_are_bf16"]  # the rounded masters, as unsharded
        assert report["steps_untouched_by_saving"]  # DCP saw a stepped optimizer and did not step it again
        if exact_resume:  # Triton's CPU interpreter rounds fp32 -> bf16 by truncation where torch (and Triton on
            # CUDA) round to nearest, so there a resumed run's parameters (rounded by torch on loading) part from the
            # kernel-rounded ones by an ulp and the runs drift apart
            assert report["resumed_equal"] and report["resumed_masters_equal"]
        assert report["refused_swap"]
    saved = reports[0]["saved"]
    assert saved["0.weight"] == {"exp_avg": [[33, 16], "torch.float32"], "exp_avg_sq": [[33, 16], "torch.float32"],
                                 "master_weight": [[33, 16], "torch.float32"]}  # whole tensors, by name
    assert set(saved) == {"0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"}
