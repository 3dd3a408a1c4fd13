"""The fastest attention this GPU has, registered with transformers' `AttentionInterface` as `"ghostvis_sdpa"`.

- Dense batches (and the vision tower): PyTorch SDPA with the cuDNN backend first in the priority list. On an H100
  the issue measured cuDNN at 298 TFLOP/s vs 183 for SDPA's default flash backend (B4, 12 heads, T 2048, D 128,
  causal, fwd+bwd). K/V heads are repeated before the call: cuDNN has no GQA, and with `enable_gqa=True` SDPA would
  silently pick another backend.
- Packed batches (`cu_seq_lens_q` in the kwargs, as `ghostvis_hf.training.packing` and TRL's padding-free collator
  write them): `torch.nn.attention.varlen.varlen_attn`, which computes only the per-sample causal blocks, instead of a
  dense block-diagonal mask over the whole row.
- Everything else (a padding mask, no CUDA, fp32 inputs): transformers' own `sdpa_attention_forward`, unchanged.

`flash_attention_2` is used instead when the flash-attn package is installed (it handles packing natively).
The mask function registered alongside is transformers' `sdpa_mask`, so a packed batch on the SDPA path gets the
block-diagonal causal mask that transformers derives from restarting `position_ids`.
"""

import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import _compat

ATTN_IMPLEMENTATION = "ghostvis_sdpa"
SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
# Non-causal attention (the vision tower) on its own list, so that it can be measured apart:
# `GHOSTVIS_VISION_SDPA=flash` puts the flash backend first there (the text decoder keeps cuDNN first).
VISION_SDPA_PRIORITY = (
    [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if os.environ.get("GHOSTVIS_VISION_SDPA", "cudnn") == "flash"
    else SDPA_PRIORITY
)
# Calls per path since import (tests and the benchmark read these to prove which path ran).
CALLS = {"varlen": 0, "sdpa_cudnn_first": 0, "sdpa": 0}
# Devices that take the fast paths; CPU tests add "cpu" (with a reference varlen) to exercise the plumbing.
FAST_DEVICES = {"cuda"}


def _count(path: str) -> None:
    # NOTE: not under torch.compile: a Python counter mutated in a compiled region becomes a guard on its value,
    # which recompiles every call (seen on torch 2.11: the recompile limit was hit, the layers ran eager).
    if not torch.compiler.is_compiling():
        CALLS[path] += 1


class _CapturableVarlen(torch.autograd.Function):
    """`varlen_attn`'s flash kernels (forward and backward) through a plain autograd Function, for CUDA-graph captures.

    NOTE: the backward of torch 2.11's `varlen_attn` (a `torch.library` custom op) fails inside a capture with
    `cudaErrorStreamCaptureImplicit` (H200, torch 2.11+cu130, measured 2026-11-30); calling the same ATen flash ops
    from this Function captures and replays with identical results. Used only while a stream captures (private ATen
    ops: `varlen_attn` stays the path everywhere else).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
        ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse, rng_state, unused)
        ctx.args = (max_q, max_k, causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cu_q, cu_k, out, lse, rng_state, unused = ctx.saved_tensors
        max_q, max_k, causal, scale = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state, unused,
            scale=scale)
        return dq, dk, dv, None, None, None, None, None, None


def _varlen_forward(module, query, key, value, scaling, cu_q, cu_k, max_q, max_k, causal):
    fn = _compat.varlen_attn_fn()
    b, h, t, d = query.shape
    dtype = query.dtype
    if dtype not in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)  # RoPE with fp32 cos/sin promotes q/k under autocast
    gqa = key.shape[1] != h
    kwargs = _compat.varlen_call_kwargs(fn, causal=causal, gqa=gqa)
    if kwargs is None:  # this PyTorch's varlen_attn has no GQA flag
        key, value = repeat_kv(key, h // key.shape[1]), repeat_kv(value, h // value.shape[1])
        kwargs = _compat.varlen_call_kwargs(fn, causal=causal, gqa=False)
    q = query.transpose(1, 2).reshape(b * t, h, d).to(dtype)  # [B*T, H, D]
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d).to(dtype)  # [B*T, H_kv, D]
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d).to(dtype)
    if q.is_cuda and torch.cuda.is_current_stream_capturing():  # GQA: flash takes fewer K/V heads natively
        out = _CapturableVarlen.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scaling)
    else:
        out = fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **kwargs)  # [B*T, H, D]
    _count("varlen")
    return out.view(b, t, h, d), None


def reads_cu_seq_lens(config, device: torch.device, dtype: torch.dtype, training: bool = True) -> bool:
    """Whether a decoder with this (text) config keeps packed sequences apart by `cu_seq_lens` alone on `device` with
    inputs of `dtype` (or under autocast): GhostVis's attention on its varlen path (the conditions of
    `ghostvis_attention_forward`: CUDA, fp16/bf16 or autocast, no dropout, no sliding window) or flash-attn. Then
    the decoder's masks are not needed for a packed batch (`no_mask_mapping` in `training.graph_step`)."""
    text = config.get_text_config()
    impl = str(text._attn_implementation)
    if impl.startswith("flash_attention"):
        return True
    half = dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(device.type)
    return (impl == ATTN_IMPLEMENTATION and device.type in FAST_DEVICES and _compat.varlen_attn_fn() is not None
            and (half or device.type != "cuda") and not getattr(text, "use_sliding_window", False)
            and not (training and getattr(text, "attention_dropout", 0.0)))


def ghostvis_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention function with transformers' `AttentionInterface` signature; see the module docstring."""
    cu_q = kwargs.get("cu_seq_lens_q")
    fast_device = query.device.type in FAST_DEVICES
    use_varlen = (
        cu_q is not None
        and fast_device
        and dropout == 0.0
        and kwargs.get("sliding_window") is None
        and _compat.varlen_attn_fn() is not None
        and query.shape[2] > 1
        # flash/cuDNN varlen kernels take fp16/bf16 only
        and (query.device.type != "cuda" or query.dtype != torch.float32 or torch.is_autocast_enabled("cuda"))
    )
    if use_varlen:
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        max_q = int(kwargs.get("max_length_q"))
        max_k = int(kwargs.get("max_length_k") or max_q)
        causal = bool(getattr(module, "is_causal", True))
        return _varlen_forward(
            module, query, key, value, scaling, cu_q.int(), cu_k.int(), max_q, max_k, causal
        )
    if cu_q is not None and attention_mask is None and query.shape[2] > 1 and cu_q.numel() - 1 > query.shape[0]:
        # more sequences than rows and no mask: only cu_seq_lens keeps them apart, and this path cannot read it
        raise ValueError(f"a packed batch ({cu_q.numel() - 1} sequences in {query.shape[0]} rows) reached an attention "
                         f"path that needs a mask (device {query.device.type}, {query.dtype}, dropout {dropout}, "
                         f"sliding window {kwargs.get('sliding_window')}) without one")
    if not fast_device or key.shape[2] != query.shape[2] or kwargs.get("sliding_window") is not None:
        _count("sdpa")  # decoding with a cache, sliding windows, CPU: transformers' own path
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # [B, H, T, D]
    is_causal = query.shape[2] > 1 and attention_mask is None and bool(getattr(module, "is_causal", True))
    if torch.compiler.is_compiling():
        # Under torch.compile the priority is set process-wide by `set_sdpa_priority` instead.
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal
        )
    else:
        _count("sdpa_cudnn_first")
        with sdpa_kernel(SDPA_PRIORITY if is_causal else VISION_SDPA_PRIORITY, set_priority=True):
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal
            )
    return out.transpose(1, 2).contiguous(), None  # [B, T, H, D]


def _vision_attention_module(model):
    """The first bidirectional attention module on the `"ghostvis_sdpa"` path (the vision tower's), or `None`."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if (getattr(module, "is_causal", None) is False and hasattr(module, "num_heads") and hasattr(module, "head_dim")
                and getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
                and getattr(config, "image_size", None) and getattr(config, "patch_size", None)):
            return module
    return None


def warm_up_vision_attention(model, image_counts, dtype: torch.dtype = torch.bfloat16) -> dict | None:
    """Builds cuDNN's attention graphs for the vision tower at every image count a run will feed it, before it runs.

    cuDNN's SDPA builds (and caches) an execution graph per input shape: measured on an H200 (torch 2.11, cuDNN 9),
    ~130-150 ms for the forward and backward of SigLIP-so400m's attention at each new batch size, against ~1 ms a
    call once built (docs/benchmarks/vision_attention.md). Token-budget steps carry a varying number of images, so
    without this a run stalls at every image count it meets for the first time (and, under DDP, every rank waits).
    A bidirectional attention module of the model is called, forward and (when the tower trains) backward, on zeros
    laid out as the tower's projections lay them out; no parameter is touched. Does nothing (returns `None`) off
    CUDA, for another attention implementation, when `GHOSTVIS_VISION_SDPA=flash` or for float32.

    Args:
        model: a GhostVis (or LLaVA-like) model whose vision tower runs `"ghostvis_sdpa"` attention.
        image_counts (`Iterable[int]`): images per forward (the vision tower's batch sizes) to build graphs for.
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): the attention's input dtype in training.

    Returns:
        `dict | None`: `{"image_counts": [...], "backward": bool, "seconds": ...}` for what was built.
    """
    counts = sorted({int(n) for n in image_counts if int(n) > 0})
    if not counts or VISION_SDPA_PRIORITY[0] != SDPBackend.CUDNN_ATTENTION or dtype not in (torch.bfloat16,
                                                                                            torch.float16):
        return None
    module = _vision_attention_module(model)
    if module is None:
        return None
    device = next((p.device for p in module.parameters() if p.device.type == "cuda"), None)
    if device is None:
        return None
    tokens = (module.config.image_size // module.config.patch_size) ** 2
    heads, dim = module.num_heads, module.head_dim
    # a frozen tower runs its attention without autograd: another graph (no backward, no saved statistics)
    trains = any(p.requires_grad for p in module.parameters())
    start = time.perf_counter()
    with torch.set_grad_enabled(trains):
        for n in counts:
            # [B, T, H, D] viewed as [B, H, T, D]: the layout of the tower's projections after `.transpose(1, 2)`
            q, k, v = (torch.zeros(n, tokens, heads, dim, device=device, dtype=dtype, requires_grad=trains)
                       for _ in range(3))
            out, _ = ghostvis_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                None, scaling=getattr(module, "scale", None))
            if trains:
                out.backward(torch.ones_like(out))
    torch.cuda.synchronize(device)
    return {"image_counts": counts, "backward": trains, "seconds": round(time.perf_counter() - start, 3)}


def register() -> str:
    """Registers `"ghostvis_sdpa"` with transformers (idempotent) and returns the name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, ghostvis_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


_previous_priority = None


def set_sdpa_priority(enable: bool = True) -> None:
    """Process-wide cuDNN-first SDPA priority (for `torch.compile`d layers, which skip the per-call context).

    NOTE: private `torch._C._set_sdp_priority_order`, as `sdpa_kernel(..., set_priority=True)` uses it; `enable=False`
    restores the order seen before the first call.
    """
    global _previous_priority
    if enable:
        if _previous_priority is None:
            _previous_priority = torch._C._get_sdp_priority_order()
        torch._C._set_sdp_priority_order([int(b) for b in SDPA_PRIORITY])
    elif _previous_priority is not None:
        torch._C._set_sdp_priority_order(_previous_priority)
        _previous_priority = None


def set_attention(model, implementation: str) -> dict[str, str]:
    """Sets the attention of the text decoder and the vision tower of a GhostVis (or LLaVA-like) model.

    Args:
        model: a model with `.model.language_model` / `.model.vision_tower` (or `.language_model` / `.vision_tower`).
        implementation (`str`): `"auto"` (flash_attention_2 if flash-attn is installed, else `"ghostvis_sdpa"` on
            CUDA, else leave as is), `"ghostvis_sdpa"`, `"flash_attention_2"`, `"sdpa"` or `"eager"`.

    Returns:
        `dict[str, str]`: the implementation now set per tower.
    """
    inner = getattr(model, "model", model)
    text = getattr(inner, "language_model", None)
    vision = getattr(inner, "vision_tower", None)
    if implementation == "auto":
        if not _compat.want_fast(torch.cuda.is_available(), "attention"):
            return {"text": text.config._attn_implementation, "vision": vision.config._attn_implementation}
        implementation = "flash_attention_2" if _compat.flash_attn_available() else ATTN_IMPLEMENTATION
    register()
    text_impl = implementation
    vision_impl = ATTN_IMPLEMENTATION if implementation == "flash_attention_2" else implementation
    text.config._attn_implementation = text_impl
    if vision is not None:
        vision.config._attn_implementation = vision_impl
    return {"text": text_impl, "vision": vision_impl if vision is not None else "none"}
