"""Fused linear cross-entropy for GhostVis's LM head: the loss straight from hidden states, never `[tokens, vocab]`.

Two backends behind one call signature (`GhostVisForConditionalGeneration.linear_cross_entropy`):
- `"liger"`: Liger's `LigerFusedLinearCrossEntropyFunction` (Triton; CUDA only).
- `"torch"`: `ChunkedLinearCrossEntropyFunction` below, plain PyTorch, any device. Same trick as Liger: walk the
  tokens in chunks, compute each chunk's logits, loss and logit-gradient in the forward pass, and keep only the
  gradients of the hidden states and of the head weight, so peak extra memory is one chunk of logits.

Both score only the positions whose (shifted) label is not -100: with an assistant-only SFT loss most positions are
prompt, image or padding, and the head is the largest matmul of a small model, so this also saves time. Selecting
them is one device-to-host sync (their count sets a shape). The `"liger"` backend drives Liger's row kernel itself
(`StaticLigerLinearCrossEntropyFunction`, where liger-kernel's kernel has the arguments it passes): Liger's own entry
point adds two more syncs a step (`.item()` of the scored count in the forward, `torch.equal` of the incoming
gradient with a new device tensor in the backward); each one drains the GPU's queue of work the host had launched
ahead. A CUDA-graph capture allows no sync: `static=True` (and any call made while a CUDA stream is capturing) scores
every position instead, the ignored ones weighted 0, with the scale kept on the device: same loss and gradients,
fixed shapes, no sync; with the `"liger"` backend on CUDA through the same row-kernel function, otherwise the
`"torch"` backend, masked.

NOTE: Liger's default chunking (`chunk_mem_const=1`) keeps the transient logits at about `tokens x hidden`; for a
152k vocabulary and 1.5k hidden that is 128-token chunks and 64 fp32 read-modify-writes of the whole head gradient
per step, which is why the issue's "Qwen2 + Liger" anchor ran *slower* than stock. The row-kernel path takes
1,024-token chunks (`chunk_size`, ~0.3 GB of bf16 logits); Liger's entry point, the fallback, gets
`chunk_mem_const=8` (the same for 8k tokens).
"""

import inspect

import torch
from torch import nn

IGNORE_INDEX = -100


def _inverse_count(num_items_in_batch, device):
    """`1 / num_items_in_batch` without a host sync: the Trainer's device tensor stays on the device, a Python number
    stays a Python float (a host-to-device copy would be one, and a CUDA-graph capture allows none)."""
    if torch.is_tensor(num_items_in_batch):
        return 1.0 / num_items_in_batch.to(device, torch.float32)
    return 1.0 / float(num_items_in_batch)


def _shift_and_select(hidden_states: torch.Tensor, labels: torch.Tensor):
    """Next-token targets without copying the hidden states; returns only the scored rows, `[N, d]` and `[N]`.

    One host sync (the count of scored rows sets their shape): the positions are found once and both tensors gathered
    with them, where two boolean-mask selections would each read the count back.
    """
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)  # [B*T]
    index = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, index), shifted.index_select(0, index)


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    """`sum_i CE(h_i @ W^T (+ b), y_i) * scale` with gradients computed chunk by chunk in the forward pass.

    Under autocast the matmuls run in the autocast dtype (as `lm_head` would); log-sum-exp and the softmax are fp32;
    the weight gradient is accumulated in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk_size: int, masked: bool = False):
        dev = hidden.device.type
        autocast = torch.is_autocast_enabled(dev)
        mm_dtype = torch.get_autocast_dtype(dev) if autocast else torch.promote_types(hidden.dtype, weight.dtype)
        need_grad = any(ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros_like(bias, dtype=torch.float32)
        # fp32 accumulation of a low-precision matmul without a [V, d] temporary (CUDA, torch >= 2.8)
        out_dtype_ok = dev == "cuda" and mm_dtype in (torch.bfloat16, torch.float16) and grad_weight is not None
        loss = hidden.new_zeros((), dtype=torch.float32)
        with torch.autocast(dev, enabled=False):
            w = weight.to(mm_dtype)  # one cast of the head, not one per chunk
            b = None if bias is None else bias.to(mm_dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(mm_dtype)  # [c, d]
                y = targets[start : start + chunk_size]  # [c]
                if masked:  # every position, the ignored ones weighted 0 (fixed shapes, no sync)
                    keep = (y != IGNORE_INDEX).float()
                    y = y.clamp_min(0)
                logits = nn.functional.linear(h, w, b).float()  # [c, V]
                lse = torch.logsumexp(logits, dim=-1)  # [c]
                nll = lse - logits.gather(1, y[:, None]).squeeze(1)
                loss += (nll * keep).sum() if masked else nll.sum()
                if not need_grad:
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, written over the logits
                g[torch.arange(h.shape[0], device=h.device), y] -= 1.0
                g = g.mul_((keep * scale)[:, None] if masked else scale).to(mm_dtype)  # d loss / d logits, [c, V]
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = g @ w
                if grad_weight is not None:
                    if out_dtype_ok:
                        try:
                            torch.addmm(grad_weight, g.t(), h, out_dtype=torch.float32, out=grad_weight)
                        except (TypeError, RuntimeError):
                            out_dtype_ok = False
                    if not out_dtype_ok:
                        grad_weight += (g.t() @ h).float()
                if grad_bias is not None:
                    grad_bias += g.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def torch_linear_cross_entropy(hidden, weight, bias, targets, scale, chunk_size: int = 1024, masked: bool = False):
    """Plain-PyTorch fused linear cross-entropy over already shifted rows (see module docstring): selected ones, or
    with `masked` all of them, the -100 targets weighted 0. `scale` is a float or a 0-d tensor."""
    return ChunkedLinearCrossEntropyFunction.apply(hidden, weight, bias, targets, scale, chunk_size, masked)


def liger_row_kernel():
    """`(kernel, max block)`: Liger's per-row cross-entropy Triton kernel (loss + logit gradient in place), or `None`
    where it is missing or its arguments are not exactly the ones `StaticLigerLinearCrossEntropyFunction` passes
    (liger-kernel 0.8.5's), so that a release that changes them falls back to the plain-PyTorch path instead of
    failing."""
    try:
        from liger_kernel.ops import cross_entropy as liger_ce
    except ImportError:
        return None
    kernel = getattr(liger_ce, "liger_cross_entropy_kernel", None)
    names = set(getattr(kernel, "arg_names", ()) or ())
    if kernel is None or names != set(_LIGER_ROW_ARGS) | _LIGER_CHUNK_ARGS or not hasattr(liger_ce, "MAX_FUSED_SIZE"):
        return None
    return kernel, liger_ce.MAX_FUSED_SIZE


# Every argument of liger_cross_entropy_kernel (liger-kernel 0.8.5) but the tensors of one chunk, for a plain
# sum of per-row losses: no class weights, label smoothing, z-loss, soft-capping or token accuracy.
_LIGER_ROW_ARGS = dict(
    weight_ptr=None, z_loss_ptr=None, token_accuracy_ptr=None, token_accuracy_stride=0, predicted_tokens_ptr=None,
    predicted_tokens_stride=0, n_non_ignore=1.0, sum_non_ignore_weight=1.0, weight_sum=0.0, ignore_index=IGNORE_INDEX,
    lse_square_scale=0.0, label_smoothing=0.0, reduction="sum", softcap=None, RETURN_Z_LOSS=False,
    RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, HAS_WEIGHT=False, HAS_SOFTCAPPING=False,
)
_LIGER_CHUNK_ARGS = {"X_ptr", "X_stride", "Y_ptr", "Y_stride", "loss_ptr", "loss_stride", "n_cols", "HAS_GRADIENTS",
                     "BLOCK_SIZE"}


class StaticLigerLinearCrossEntropyFunction(torch.autograd.Function):
    """`sum_i CE(h_i @ W^T (+ b), y_i) * scale` over every row given (rows with target -100 contribute 0), chunk by
    chunk, with Liger's row kernel: one pass over each chunk's bf16 logits writes the loss and, in place, the logit
    gradient (the softmax in fp32 inside the kernel). Nothing is read on the host: Liger's own entry point counts the
    scored rows with `.item()` to average them and compares the incoming gradient with 1 in its backward, which a
    CUDA-graph capture does not allow and which stall the host every step; here the kernel sums (its count argument
    is unused for a sum) and `scale`, a float or a device tensor, multiplies the loss and the two gradients once at
    the end. "Static": it takes every row it is given with fixed shapes; the eager path gives it the scored rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk_size: int):
        kernel, max_block = liger_row_kernel()
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
        block = min(max_block, 1 << (vocab - 1).bit_length())  # the next power of 2, as Liger sizes it
        rows = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] \
            else None
        with torch.autocast("cuda", enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, n, chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)  # [c, d]
                y = targets[start : start + chunk_size].contiguous()  # [c]
                logits = nn.functional.linear(h, w, b).contiguous()  # [c, V], becomes d loss / d logits
                out = rows[start : start + chunk_size]
                kernel[(h.shape[0],)](
                    X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=y, Y_stride=y.stride(-1), loss_ptr=out,
                    loss_stride=out.stride(-1), n_cols=vocab, HAS_GRADIENTS=True, BLOCK_SIZE=block, num_warps=32,
                    **_LIGER_ROW_ARGS,
                )
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = logits @ w
                if grad_weight is not None:  # fp32 accumulation without a [V, d] temporary (torch >= 2.8)
                    try:
                        torch.addmm(grad_weight, logits.t(), h, out_dtype=torch.float32, out=grad_weight)
                    except (TypeError, RuntimeError):
                        grad_weight += (logits.t() @ h).float()
                if grad_bias is not None:
                    grad_bias += logits.float().sum(0)
        tensor_scale = torch.is_tensor(scale)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, scale if tensor_scale else None)
        ctx.scale = None if tensor_scale else scale
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias, scale = ctx.saved_tensors
        factor = grad_output * (ctx.scale if scale is None else scale)  # 0-d, on the device
        if grad_hidden is not None:
            grad_hidden = grad_hidden * factor.to(grad_hidden.dtype)
        if grad_weight is not None:  # in place: no second fp32 [V, d] at the step's memory peak
            grad_weight = grad_weight.mul_(factor).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(factor).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None


def liger_linear_cross_entropy(hidden, weight, bias, targets, scale: float, chunk_mem_const: int = 8):
    """Liger's fused linear cross-entropy (`reduction="sum"`, times `scale`). Imports Liger: CUDA only."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    kwargs = {"bias": bias, "ignore_index": IGNORE_INDEX, "reduction": "sum"}
    params = inspect.signature(liger_fused_linear_cross_entropy).parameters
    if "chunk_mem_const" in params:
        kwargs["chunk_mem_const"] = chunk_mem_const
    if "accum_dtype" in params and weight.dtype != torch.float32:
        kwargs["accum_dtype"] = torch.float32  # bf16 params: accumulate the head gradient in fp32
    return liger_fused_linear_cross_entropy(hidden, weight, targets, **kwargs) * scale


class LinearCrossEntropy:
    """The callable installed as `model.linear_cross_entropy`: `(hidden [B, T, d], lm_head, labels [B, T],
    num_items_in_batch) -> loss`, with the semantics of transformers' `ForCausalLMLoss` (shift by one, ignore -100,
    sum / `num_items_in_batch`, or mean over the scored tokens when it is `None`).

    Args:
        backend (`str`): `"liger"` or `"torch"`.
        chunk_size (`int`, *optional*, defaults to 1024): tokens per chunk for the `"torch"` backend and Liger's
            row kernel.
        chunk_mem_const (`int`, *optional*, defaults to 8): for Liger's own entry point (used where its row kernel's
            arguments differ from liger-kernel 0.8.5's): its transient-logits budget in units of `tokens x hidden`
            (larger = fewer, bigger chunks).
        static (`bool`, *optional*, defaults to `False`): no host syncs and fixed shapes (see the module docstring),
            for CUDA-graph captures; also on whenever a call is made while a CUDA stream is capturing.
    """

    def __init__(self, backend: str = "torch", chunk_size: int = 1024, chunk_mem_const: int = 8, static: bool = False):
        if backend not in ("liger", "torch"):
            raise ValueError(f"backend={backend!r} is not supported; allowed: ['liger', 'torch']")
        self.backend = backend
        self.chunk_size = chunk_size
        self.chunk_mem_const = chunk_mem_const
        self.static = static

    def __repr__(self):
        return f"LinearCrossEntropy(backend={self.backend!r}{', static=True' if self.static else ''})"

    def __call__(self, hidden_states, lm_head: nn.Linear, labels, num_items_in_batch=None):
        labels = labels.to(hidden_states.device)
        if self.static or (hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self._static(hidden_states, lm_head, labels, num_items_in_batch)
        hidden, targets = _shift_and_select(hidden_states, labels)  # NOTE: a host sync (the selection's size)
        if targets.numel() == 0:  # keep the graph connected so backward() works on an all-ignored batch
            return hidden_states.sum() * 0.0
        if num_items_in_batch is None:
            scale = 1.0 / targets.numel()  # the mean over the scored tokens, as ForCausalLMLoss
        else:
            scale = _inverse_count(num_items_in_batch, hidden.device)
        if self.backend == "liger":
            if hidden.is_cuda and liger_row_kernel() is not None:  # Liger's kernel without its entry point's syncs
                return StaticLigerLinearCrossEntropyFunction.apply(
                    hidden, lm_head.weight, lm_head.bias, targets, scale, self.chunk_size)
            return liger_linear_cross_entropy(
                hidden, lm_head.weight, lm_head.bias, targets, scale, self.chunk_mem_const
            )
        return torch_linear_cross_entropy(hidden, lm_head.weight, lm_head.bias, targets, scale, self.chunk_size)

    def _static(self, hidden_states, lm_head: nn.Linear, labels, num_items_in_batch=None):
        targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
        if num_items_in_batch is None:  # the mean over scored tokens, on the device
            scale = 1.0 / (targets != IGNORE_INDEX).sum().clamp_min(1).float()
        else:
            scale = _inverse_count(num_items_in_batch, hidden_states.device)
        if self.backend == "liger" and hidden_states.is_cuda and liger_row_kernel() is not None:
            return StaticLigerLinearCrossEntropyFunction.apply(
                hidden_states.reshape(-1, hidden_states.shape[-1]), lm_head.weight, lm_head.bias, targets, scale,
                self.chunk_size)
        return torch_linear_cross_entropy(hidden_states.reshape(-1, hidden_states.shape[-1]), lm_head.weight,
                                          lm_head.bias, targets, scale, self.chunk_size, masked=True)
