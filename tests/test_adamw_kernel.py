"""The fused master-weight AdamW kernel (`ghostvis_hf.kernels.adamw`) against torch's AdamW, and the optimizer's
two paths (`kernel="triton"` / `"torch"`) against each other, resume included.

The kernel runs on CUDA, or in Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is imported): on a CPU
machine `test_in_triton_interpreter` runs this file again in a subprocess with it set.
"""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from ghostvis_hf.inference.triton_decode import interpreting  # noqa: E402
from ghostvis_hf.training.optimizer import MasterWeightOptimizer  # noqa: E402

RUNS = torch.cuda.is_available() or interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest), so the trajectories of the two paths
# would part there: the interpreter checks the low-precision parameters in float16, which it rounds like torch.
LOW = torch.bfloat16 if torch.cuda.is_available() else torch.float16
needs_kernel = pytest.mark.skipif(not RUNS, reason="needs CUDA or TRITON_INTERPRET=1 (see test_in_triton_interpreter)")


def _rounded(low, master):
    """`low` is `master` rounded to nearest on the GPU; within one ulp in the interpreter (its own conversions)."""
    torch.testing.assert_close(low, master.to(low.dtype), rtol=0 if torch.cuda.is_available() else 2e-3, atol=0)


@needs_kernel
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kernel_is_torch_adamw_on_fp32_weights(weight_decay):
    from ghostvis_hf.kernels.adamw import adamw_master_step

    g = torch.Generator().manual_seed(0)
    n = 5000  # not a multiple of the block: the masked tail
    w = torch.randn(n, generator=g).to(DEVICE)
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    master, m, v = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
    param = w.to(LOW)
    for step, lr in enumerate([1e-2, 5e-3, 2e-3, 1e-3, 1e-3], start=1):
        grad = torch.randn(n, generator=g).to(DEVICE) * 10 ** (step - 3)  # gradients of changing scale
        ref.grad = grad.to(torch.bfloat16).float()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        adamw_master_step([param], [grad.to(torch.bfloat16)], [master], [m], [v], [step], lr, 0.9, 0.95, 1e-8,
                          weight_decay)
        torch.testing.assert_close(master, ref.detach(), rtol=2e-6, atol=1e-7)
        for ours, theirs in ((m, opt.state[ref]["exp_avg"]), (v, opt.state[ref]["exp_avg_sq"])):
            # fp32 rounding of a fused multiply-add where torch rounds twice: 1e-6 of the moment's scale
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item())
        _rounded(param, master)
    assert (master - w).abs().max() > 1e-3  # it moved


@needs_kernel
def test_compact_masters_step_exactly_like_fp32_masters():
    """int16 remainders under bf16 parameters (`split_master`) are the fp32 masters, bit for bit, at every step."""
    from ghostvis_hf.kernels.adamw import adamw_master_step
    from ghostvis_hf.kernels.master_bits import join_master, split_master

    g = torch.Generator().manual_seed(1)
    sizes = (5000, 4096, 3)  # a masked tail, whole blocks, a tiny tensor: one launch
    masters = [torch.randn(n, generator=g).to(DEVICE) * 10.0 ** k for k, n in enumerate(sizes)]
    state = [(torch.zeros_like(w), torch.zeros_like(w)) for w in masters]
    compact = [split_master(w) for w in masters]
    c_state = [(torch.zeros_like(w), torch.zeros_like(w)) for w in masters]
    for step in range(1, 7):
        grads = [(torch.randn(w.numel(), generator=g).to(DEVICE) * 3).to(torch.bfloat16) for w in masters]
        throwaway = [w.to(torch.bfloat16) for w in masters]  # the fp32 path's own (rounded-to-nearest) parameters
        adamw_master_step(throwaway, grads, masters, [m for m, _ in state], [v for _, v in state], [step] * 3,
                          1e-2, 0.9, 0.95, 1e-8, 0.1)
        adamw_master_step([p for p, _ in compact], grads, [lo for _, lo in compact], [m for m, _ in c_state],
                          [v for _, v in c_state], [step] * 3, 1e-2, 0.9, 0.95, 1e-8, 0.1)
        for w, (p, lo), (m, v), (cm, cv) in zip(masters, compact, state, c_state):
            assert torch.equal(join_master(p, lo), w)  # the master, exactly
            assert torch.equal(p, split_master(w)[0])  # the parameter: its nearest bf16
            assert torch.equal(cm, m) and torch.equal(cv, v)
    assert not torch.equal(masters[0], split_master(masters[0])[0].float())  # the remainders carry something
    with pytest.raises(ValueError, match="compact"):
        adamw_master_step([compact[0][0].half()], [grads[0]], [compact[0][1]], [c_state[0][0]], [c_state[0][1]], [7],
                          1e-2, 0.9, 0.95, 1e-8, 0.1)


@needs_kernel
def test_compact_optimizer_keeps_the_same_masters_and_resumes_either_way():
    """`MasterWeightOptimizer(compact=True)`: int16 remainders instead of fp32 copies, the same fp32 masters as the
    fp32-copy optimizer on the same gradients, and state dicts that load into either."""
    g = torch.Generator().manual_seed(3)
    shapes = [(64, 33), (33,), (5, 7, 3)]
    weights = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(DEVICE).to(torch.bfloat16) for s in shapes] for _ in range(8)]

    def make(compact, source=weights):
        params = [torch.nn.Parameter(w.clone()) for w in source]
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
        opt = MasterWeightOptimizer(groups, torch.optim.AdamW, param_dtype=torch.bfloat16, kernel="triton",
                                    compact=compact, lr=1e-2, betas=(0.9, 0.95))
        return params, opt

    def steps(params, opt, gs):
        for step_grads in gs:
            for p, gr in zip(params, step_grads):
                p.grad = gr.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)

    full_p, full = make(False)
    lean_p, lean = make(True)
    assert all(m.dtype == torch.int16 for m in lean._masters) and all(p.dtype == torch.bfloat16 for p in lean_p)
    steps(full_p, full, grads[:4])
    steps(lean_p, lean, grads[:4])
    for a, b in zip(full.master_weights, lean.master_weights):
        assert torch.equal(a, b)
    state = lean.state_dict()
    assert all(s["master_weight"].dtype == torch.float32 for s in state["state"].values())
    other_p, other = make(False, source=[w.float() for w in full_p])  # a run that resumes without compact masters
    other.load_state_dict(copy.deepcopy(state))  # as saved and loaded (a state dict shares the live moments)
    again_p, again = make(True, source=[w.float() for w in full_p])  # and one that resumes with them
    again.load_state_dict(copy.deepcopy(full.state_dict()))
    for params, opt in ((full_p, full), (lean_p, lean), (other_p, other), (again_p, again)):
        steps(params, opt, grads[4:])
    for opt in (lean, other, again):
        for a, b in zip(full.master_weights, opt.master_weights):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="compact"):
        MasterWeightOptimizer([torch.nn.Parameter(weights[1].clone())], torch.optim.SGD, compact=True, lr=0.1)
    with pytest.raises(ValueError, match="compact"):
        MasterWeightOptimizer([torch.nn.Parameter(weights[1].clone())], compact=True, lazy=True, lr=0.1)


def test_split_and_join_are_exact_and_round_to_nearest():
    from ghostvis_hf.kernels.master_bits import join_master, split_master

    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(10000, generator=g) * 10.0 ** torch.randint(-30, 30, (10000,), generator=g).float(),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 1e-40, -1e-40, 3.0e38])])
    hi, lo = split_master(x)
    assert torch.equal(join_master(hi, lo).view(torch.int32), x.view(torch.int32))
    nearest = x.to(torch.bfloat16)  # round to nearest, ties to even: differs from ties-away only at exact ties
    ties = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert torch.equal(hi[~ties], nearest[~ties])


@needs_kernel
def test_kernel_refuses_mismatched_tensors():
    from ghostvis_hf.kernels.adamw import adamw_master_step

    w = torch.zeros(8, device=DEVICE)
    hyper = (1e-3, 0.9, 0.99, 1e-8, 0.0)
    with pytest.raises(ValueError, match="same number of elements"):
        adamw_master_step(w.bfloat16(), w[:4], w, w.clone(), w.clone(), 1, *hyper)
    with pytest.raises(ValueError, match="same length"):
        adamw_master_step([w.bfloat16()], [w], [w], [w.clone()], [w.clone()], [1, 2], *hyper)
    with pytest.raises(ValueError, match="float32"):
        adamw_master_step(w.bfloat16(), w, w.bfloat16(), w.clone(), w.clone(), 1, *hyper)
    with pytest.raises(ValueError, match="one parameter dtype"):
        adamw_master_step([w.bfloat16(), w.half()], [w, w], [w, w.clone()], [w.clone()] * 2, [w.clone()] * 2, [1, 1],
                          *hyper)
    big = torch.zeros(4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        adamw_master_step(big.t().bfloat16().t(), big.t(), big.t(), big.clone(), big.clone(), 1, *hyper)


@needs_kernel
def test_one_launch_steps_tensors_of_different_sizes_and_step_counts_like_one_launch_each():
    from ghostvis_hf.kernels.adamw import BLOCK, adamw_master_step

    g = torch.Generator().manual_seed(3)
    sizes, steps = [1, BLOCK, BLOCK + 7, 3 * BLOCK - 1, 0, 130], [1, 5, 2, 9, 1, 3]
    make = lambda: [torch.randn(n, generator=g).to(DEVICE) for n in sizes]  # noqa: E731
    masters, ms, grads = make(), [x.abs() for x in make()], make()
    vs = [x * x for x in make()]
    params = [x.to(LOW) for x in masters]
    copies = [[t.clone() for t in ts] for ts in (params, masters, ms, vs)]
    before = masters[3].clone()
    adamw_master_step(params, grads, masters, ms, vs, steps, 1e-2, 0.9, 0.99, 1e-8, 0.05)
    for i in range(len(sizes)):
        p, w, m, v = (c[i] for c in copies)
        adamw_master_step(p, grads[i], w, m, v, steps[i], 1e-2, 0.9, 0.99, 1e-8, 0.05)
        for ours, single in ((params[i], p), (masters[i], w), (ms[i], m), (vs[i], v)):
            assert torch.equal(ours, single)
    assert (masters[3] - before).abs().max() > 1e-3  # it moved


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.LayerNorm(40),
                               torch.nn.Linear(40, 7)).to(DEVICE)


def _groups(model):
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0, "lr": 3e-3}]


def _train(model, opt, steps, seed=1):
    """Steps with the same gradients for every model (drawn from `seed`, not computed from the model: a gradient
    computed through bf16 weights would turn a rounding difference of the masters into a different trajectory)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


@needs_kernel
def test_triton_and_torch_paths_step_the_same_masters_and_resume_across_each_other():
    a, b = _model(), _model()
    opt_a = MasterWeightOptimizer(_groups(a), torch.optim.AdamW, param_dtype=LOW, kernel="triton", lr=1e-2)
    opt_b = MasterWeightOptimizer(_groups(b), torch.optim.AdamW, param_dtype=LOW, kernel="torch", lr=1e-2)
    assert opt_a.uses_kernel and not opt_b.uses_kernel
    _train(a, opt_a, 4)
    _train(b, opt_b, 4)
    for ma, mb in zip(opt_a.master_weights, opt_b.master_weights):
        torch.testing.assert_close(ma, mb, rtol=1e-5, atol=1e-6)
    sd = opt_a.state_dict()
    assert all(int(s["step"]) == 4 for s in sd["state"].values())
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "master_weight"}  # torch AdamW's, + masters
    # the kernel path's state resumes on the torch path, and the other way round
    c, d = _model(seed=5), _model(seed=6)
    opt_c = MasterWeightOptimizer(_groups(c), torch.optim.AdamW, param_dtype=LOW, kernel="torch", lr=1e-2)
    opt_d = MasterWeightOptimizer(_groups(d), torch.optim.AdamW, param_dtype=LOW, kernel="triton", lr=1e-2)
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    opt_d.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    _train(a, opt_a, 3, seed=2)
    _train(c, opt_c, 3, seed=2)
    _train(d, opt_d, 3, seed=2)
    for ma, mc, md in zip(opt_a.master_weights, opt_c.master_weights, opt_d.master_weights):
        torch.testing.assert_close(mc, ma, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(md, ma, rtol=1e-5, atol=1e-6)
    for p, m in zip([p for g in opt_a.param_groups for p in g["params"]], opt_a.master_weights):
        assert p.dtype == LOW
        _rounded(p, m)


def test_auto_picks_the_kernel_only_for_adamw_on_cuda():
    model = torch.nn.Linear(4, 4)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, param_dtype=torch.bfloat16)
    assert not opt.uses_kernel  # parameters on the CPU
    if torch.cuda.is_available():
        model.cuda()  # as the trainer does after the recipe built the optimizer
        assert opt.uses_kernel
    assert not MasterWeightOptimizer(model.parameters(), torch.optim.Adam, param_dtype=torch.bfloat16).uses_kernel
    with pytest.raises(ValueError, match="steps AdamW"):
        MasterWeightOptimizer(model.parameters(), torch.optim.SGD, kernel="triton", lr=0.1)
    with pytest.raises(ValueError, match="kernel must be"):
        MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, kernel="cuda")


@pytest.mark.skipif(RUNS, reason="the kernel runs directly here")
def test_in_triton_interpreter():
    """On a CPU machine: this file's kernel tests, run by Triton's interpreter in a subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k",
                           "not interpreter and not auto_picks"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == 8 and "skipped" not in proc.stdout, proc.stdout[-500:]
