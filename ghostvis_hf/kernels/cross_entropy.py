"""Fused linear cross-entropy for GhostVis's LM head: the loss straight from hidden states, never `[tokens, vocab]`.

Two backends behind one call signature (`GhostVisForConditionalGeneration.linear_cross_entropy`):
- `"liger"`: Liger's `LigerFusedLinearCrossEntropyFunction` (Triton; CUDA only).
- `"torch"`: `ChunkedLinearCrossEntropyFunction` below, plain PyTorch, any device. Same trick as Liger: walk the
  tokens in chunks, compute each chunk's logits, loss and logit-gradient in the forward pass, and keep only the
  gradients of the hidden states and of the head weight, so peak extra memory is one chunk of logits.

Both score only the positions whose (shifted) label is not -100: with an assistant-only SFT loss most positions are
prompt, image or padding, and the head is the largest matmul of a small model, so this also saves time. Selecting
them is a device-to-host sync (their count sets a shape), as is Liger's own count of them, and `num_items_in_batch`
is read on the host. A CUDA-graph capture allows none of these: `static=True` (and any call made while a CUDA stream
is capturing) runs the `"torch"` backend over every position instead, the ignored ones weighted 0, with the scale
kept on the device: same loss and gradients, fixed shapes, no sync.

NOTE: Liger's default chunking (`chunk_mem_const=1`) keeps the transient logits at about `tokens x hidden`; for a
152k vocabulary and 1.5k hidden that is 128-token chunks and 64 fp32 read-modify-writes of the whole head gradient
per step, which is why the issue's "Qwen2 + Liger" anchor ran *slower* than stock. We pass `chunk_mem_const=8`
(1,024-token chunks for 8k tokens, ~0.3 GB of bf16 logits).
"""

import inspect

import torch
from torch import nn

IGNORE_INDEX = -100


def _shift_and_select(hidden_states: torch.Tensor, labels: torch.Tensor):
    """Next-token targets without copying the hidden states; returns only the scored rows."""
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # [B, T]
    mask = shifted != IGNORE_INDEX
    return hidden_states[mask], shifted[mask]  # [N, d], [N]


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
        chunk_size (`int`, *optional*, defaults to 1024): tokens per chunk for the `"torch"` backend.
        chunk_mem_const (`int`, *optional*, defaults to 8): Liger's transient-logits budget in units of
            `tokens x hidden` (larger = fewer, bigger chunks).
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
        elif torch.is_tensor(num_items_in_batch):  # the Trainer's count stays on the device: no second sync
            scale = 1.0 / num_items_in_batch.to(hidden.device, torch.float32)
        else:
            scale = 1.0 / float(num_items_in_batch)
        if self.backend == "liger":
            return liger_linear_cross_entropy(
                hidden, lm_head.weight, lm_head.bias, targets, scale, self.chunk_mem_const
            )
        return torch_linear_cross_entropy(hidden, lm_head.weight, lm_head.bias, targets, scale, self.chunk_size)

    def _static(self, hidden_states, lm_head: nn.Linear, labels, num_items_in_batch=None):
        targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
        if num_items_in_batch is None:  # the mean over scored tokens, on the device
            scale = 1.0 / (targets != IGNORE_INDEX).sum().clamp_min(1).float()
        elif torch.is_tensor(num_items_in_batch):
            scale = 1.0 / num_items_in_batch.to(hidden_states.device, torch.float32)
        else:  # a Python number stays one (a host-to-device copy is not allowed in a capture)
            scale = 1.0 / float(num_items_in_batch)
        return torch_linear_cross_entropy(hidden_states.reshape(-1, hidden_states.shape[-1]), lm_head.weight,
                                          lm_head.bias, targets, scale, self.chunk_size, masked=True)
