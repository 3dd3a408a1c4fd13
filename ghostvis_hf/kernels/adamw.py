"""One fused AdamW step for bf16 parameters with fp32 master weights (`training.optimizer.MasterWeightOptimizer`).

The unfused step is three passes over every parameter: cast the bf16 gradient to a new fp32 tensor, torch's fused
AdamW on the fp32 master, copy the master back into the bf16 parameter. That is ~40 bytes of memory traffic per
parameter plus an fp32 gradient allocation per tensor; on the 1.5b preset it was 54 ms of a 242 ms step on an H200
(docs/benchmarks/train_throughput_2026-11-30.md). This kernel reads the bf16 gradient, the fp32 master and both
moments once and writes the moments, the master and the rounded bf16 parameter: 28 bytes per parameter, no
temporaries. Like torch's multi-tensor kernels it takes a whole list of tensors in one launch (a table of their
addresses), so the ~800 tensors of the 1.5b preset cost a handful of launches, not ~800 of Triton's Python
launcher: the training step is bound by the host as much as by the GPU.

The arithmetic is torch's AdamW (`torch.optim.AdamW`, decoupled weight decay, bias corrections, eps outside the
square root) in fp32; step counts and the learning rate are host scalars (no device sync).

NOTE: why our own kernel: torch's `_fused_adamw_` has no master-weight variant (its bf16 path updates the bf16 tensor
itself), DeepSpeed's bf16 optimizer only runs inside the DeepSpeed engine, and apex's `FusedAdam(master_weights=...)`
is a CUDA extension without a wheel here. Off CUDA (and in tests) it runs in Triton's interpreter.
"""

import torch
import triton
import triton.language as tl

from .master_bits import join_master, split_master  # noqa: F401  (the compact masters' layout, re-exported)

BLOCK = 4096
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32, torch.int16: tl.int16}
_block_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@triton.jit
def _adamw_update(param_ptr, grad_ptr, master_ptr, m_ptr, v_ptr, offs, n, lr, beta1, beta2, eps, decay, step_size,
                  bias_correction2_sqrt, PARAM: tl.constexpr, MASKED: tl.constexpr, COMPACT: tl.constexpr):
    mask = offs < n
    if MASKED:
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    else:
        g = tl.load(grad_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    if COMPACT:  # the master's bits: the bf16 parameter's 16 above, a signed 16-bit remainder below (`split_master`)
        if MASKED:
            hi = tl.load(param_ptr + offs, mask=mask, other=0.0)
            lo = tl.load(master_ptr + offs, mask=mask, other=0)
        else:
            hi = tl.load(param_ptr + offs)
            lo = tl.load(master_ptr + offs)
        hi = hi.to(tl.uint16, bitcast=True).to(tl.uint32)
        bits = (hi << 16) + lo.to(tl.int32).to(tl.uint32, bitcast=True)
        w = bits.to(tl.float32, bitcast=True)
    elif MASKED:
        w = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        w = tl.load(master_ptr + offs)
    w = w * decay  # 1 - lr * weight_decay
    m = m + (1.0 - beta1) * (g - m)  # torch's exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * g * g
    w = w - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    if COMPACT:  # the nearest bf16 above (ties away from zero), the exact remainder below
        bits = w.to(tl.uint32, bitcast=True)
        hi = (bits + 0x8000) >> 16
        rest = (bits - (hi << 16)).to(tl.int32, bitcast=True).to(tl.int16)
        low = hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        new_master = rest
    else:
        low = w.to(PARAM)
        new_master = w
    if MASKED:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(master_ptr + offs, new_master, mask=mask)
        tl.store(param_ptr + offs, low, mask=mask)
    else:
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
        tl.store(master_ptr + offs, new_master)
        tl.store(param_ptr + offs, low)


@triton.jit
def _adamw_master_kernel(table_ptr, scalars_ptr, block_tensor_ptr, block_start_ptr, lr, beta1, beta2, eps, decay,
                         PARAM: tl.constexpr, GRAD: tl.constexpr, MASTER: tl.constexpr, ALIGNED: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid).to(tl.int64)
    row = table_ptr + t * 6  # param, grad, master, exp_avg, exp_avg_sq addresses, numel
    param_ptr = tl.load(row).to(tl.pointer_type(PARAM))
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD))
    master_ptr = tl.load(row + 2).to(tl.pointer_type(MASTER))
    m_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 5)
    step_size = tl.load(scalars_ptr + t * 2)  # lr / bias_correction1
    bias_correction2_sqrt = tl.load(scalars_ptr + t * 2 + 1)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    if ALIGNED:  # addresses read from memory: say they are 16-byte aligned (checked on the host), for vector loads
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        master_ptr = tl.multiple_of(master_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # whole blocks unmasked (vectorised); the tail of each tensor masked
        _adamw_update(param_ptr, grad_ptr, master_ptr, m_ptr, v_ptr, offs, n, lr, beta1, beta2, eps, decay,
                      step_size, bias_correction2_sqrt, PARAM, False, MASTER == tl.int16)
    else:
        _adamw_update(param_ptr, grad_ptr, master_ptr, m_ptr, v_ptr, offs, n, lr, beta1, beta2, eps, decay,
                      step_size, bias_correction2_sqrt, PARAM, True, MASTER == tl.int16)


def _blocks(numels: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tensor, and where in it, each program works on; the same every step, so made once per tensor list."""
    key = (str(device), numels)
    if key not in _block_tables:
        counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
        tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first = torch.cumsum(counts, 0) - counts
        start = (torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)) * BLOCK
        if len(_block_tables) >= 16:
            _block_tables.pop(next(iter(_block_tables)))
        _block_tables[key] = (tensor.to(device=device, dtype=torch.int32), start.to(device))
    return _block_tables[key]


def adamw_master_step(params, grads, masters, exp_avgs, exp_avg_sqs, steps, lr: float, beta1: float, beta2: float,
                      eps: float, weight_decay: float) -> None:
    """One AdamW step of each fp32 `masters[i]` from `grads[i]`, in place, with `params[i]` set to the rounded result.

    Args:
        params, grads, masters, exp_avgs, exp_avg_sqs: tensors (or lists of tensors, one launch for all) on one
            device; each list's parameters share one dtype and its gradients one dtype; moments fp32; masters fp32,
            or all int16 with bf16 parameters: compact masters (`split_master`: the fp32 master is the parameter's
            bits and these 16 below, exactly); all contiguous, the i-th of each with the same number of elements.
        steps (`int` or list of `int`): each tensor's step number after this update (1 for the first).
        lr, beta1, beta2, eps, weight_decay: AdamW's hyperparameters, shared by the list.
    """
    lists = [list(x) if isinstance(x, (list, tuple)) else [x] for x in (params, grads, masters, exp_avgs, exp_avg_sqs)]
    steps = list(steps) if isinstance(steps, (list, tuple)) else [steps]
    if len({len(x) for x in lists} | {len(steps)}) != 1:
        raise ValueError("params, grads, masters, exp_avgs, exp_avg_sqs and steps must have the same length")
    if not steps:
        return
    for i, group in enumerate(zip(*lists)):
        if len({t.numel() for t in group}) != 1:
            raise ValueError(f"tensor {i}: param, grad, master and the AdamW moments must have the same number of "
                             "elements")
        if not all(t.is_contiguous() for t in group):
            raise ValueError(f"tensor {i}: adamw_master_step needs contiguous tensors")
        if group[2].dtype not in (torch.float32, torch.int16) or group[3].dtype != torch.float32 \
                or group[4].dtype != torch.float32:
            raise ValueError(f"tensor {i}: masters must be float32 (or int16: compact) and moments float32")
    ps, gs, ws = lists[0], lists[1], lists[2]
    if len({p.dtype for p in ps}) != 1 or len({g.dtype for g in gs}) != 1 or len({w.dtype for w in ws}) != 1:
        raise ValueError("one call takes one parameter dtype, one gradient dtype and one master dtype")
    if ws[0].dtype == torch.int16 and ps[0].dtype != torch.bfloat16:
        raise ValueError("compact (int16) masters go with bfloat16 parameters (their bits are the master's upper half)")
    device = ps[0].device
    rows = [[p.data_ptr(), g.data_ptr(), w.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel()]
            for p, g, w, m, v in zip(*lists)]
    aligned = all(address % 16 == 0 for row in rows for address in row[:5])
    table = torch.tensor(rows, dtype=torch.int64)
    scalars = torch.tensor([[lr / (1.0 - beta1**s), (1.0 - beta2**s) ** 0.5] for s in steps], dtype=torch.float32)
    block_tensor, block_start = _blocks(tuple(p.numel() for p in ps), device)
    _adamw_master_kernel[(block_tensor.numel(),)](
        table.to(device, non_blocking=True), scalars.to(device, non_blocking=True), block_tensor, block_start,
        lr, beta1, beta2, eps, 1.0 - lr * weight_decay,
        PARAM=_TL_DTYPES[ps[0].dtype], GRAD=_TL_DTYPES[gs[0].dtype], MASTER=_TL_DTYPES[ws[0].dtype], ALIGNED=aligned,
        BLOCK=BLOCK)

