"""One fused AdamW step for bf16 parameters with fp32 master weights (`training.optimizer.MasterWeightOptimizer`).

The unfused step is three passes over every parameter: cast the bf16 gradient to a new fp32 tensor, torch's fused
AdamW on the fp32 master, copy the master back into the bf16 parameter. That is ~40 bytes of memory traffic per
parameter plus an fp32 gradient allocation per tensor; on the 1.5b preset it was 54 ms of a 242 ms step on an H200
(docs/benchmarks/train_profile_master.txt). This kernel reads the bf16 gradient, the fp32 master and both moments
once and writes the moments, the master and the rounded bf16 parameter: 28 bytes per parameter, no temporaries.

The arithmetic is torch's AdamW (`torch.optim.AdamW`, decoupled weight decay, bias corrections, eps outside the
square root) in fp32; the step count and learning rate are host scalars (no device sync).

NOTE: why our own kernel: torch's `_fused_adamw_` has no master-weight variant (its bf16 path updates the bf16 tensor
itself), DeepSpeed's bf16 optimizer only runs inside the DeepSpeed engine, and apex's `FusedAdam(master_weights=...)`
is a CUDA extension without a wheel here. Off CUDA (and in tests) it runs in Triton's interpreter.
"""

import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _adamw_master_kernel(param_ptr, grad_ptr, master_ptr, m_ptr, v_ptr, n, lr, beta1, beta2, eps, decay,
                         step_size, bias_correction2_sqrt, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(master_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    w = w * decay  # 1 - lr * weight_decay
    m = m + (1.0 - beta1) * (g - m)  # torch's exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * g * g
    w = w - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(master_ptr + offs, w, mask=mask)
    tl.store(param_ptr + offs, w.to(param_ptr.dtype.element_ty), mask=mask)


def adamw_master_step(param, grad, master, exp_avg, exp_avg_sq, step: int, lr: float, beta1: float, beta2: float,
                      eps: float, weight_decay: float) -> None:
    """One AdamW step of `master` (fp32) from `grad` (any float dtype), in place, with `param` set to the rounded
    result. `step` is the step number after this update (1 for the first). All tensors contiguous, same numel."""
    n = master.numel()
    if not (param.numel() == grad.numel() == exp_avg.numel() == exp_avg_sq.numel() == n):
        raise ValueError("param, grad, master and the AdamW moments must have the same number of elements")
    if not all(t.is_contiguous() for t in (param, grad, master, exp_avg, exp_avg_sq)):
        raise ValueError("adamw_master_step needs contiguous tensors")
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    grid = (triton.cdiv(n, BLOCK),)
    _adamw_master_kernel[grid](param, grad, master, exp_avg, exp_avg_sq, n, lr, beta1, beta2, eps,
                               1.0 - lr * weight_decay, lr / bias_correction1, bias_correction2**0.5, BLOCK=BLOCK)
