"""Fused-kernel swaps for GhostVis training, each with a plain-PyTorch fallback.

    from ghostvis_hf.kernels import apply_kernels
    active = apply_kernels(model)  # {"rms_norm": "liger", "swiglu": "liger", "rope": "liger", "fused_ce": "liger", ...}

On CUDA with liger-kernel installed: Liger RMSNorm / SwiGLU / RoPE in the text decoder (Qwen2, Llama), Liger's
fused linear cross-entropy in GhostVis's head, cuDNN-first SDPA (varlen attention for packed batches). On a CPU,
or with `GHOSTVIS_KERNELS=fallback`: the decoder stays stock and the head uses the plain-PyTorch chunked
cross-entropy (still never materialising `[tokens, vocab]` logits). `ACTIVE` records what the last call turned on,
`force("fallback" | "fast" | None)` switches paths for tests, `reset_kernels(model)` undoes everything.
"""

import torch

from . import _compat
from ._compat import ACTIVE, force, forced, liger_available
from .attention import set_attention
from .cross_entropy import LinearCrossEntropy
from .memory import cast_frozen_params, compile_decoder_layers, enable_gradient_checkpointing, fused_adamw


def apply_kernels(model, rms_norm: bool = True, swiglu: bool | str = True, rope: bool = True, fused_ce: bool = True,
                  attention: str | None = "auto", ce_chunk_mem_const: int = 8, device=None) -> dict[str, str]:
    """Swaps fast kernels into a built GhostVis model (in place) and returns what is now active per swap.

    Args:
        model: a `GhostVisForConditionalGeneration` (the RMSNorm/SwiGLU/RoPE swaps also take any model whose text
            decoder is Qwen2 or Llama; `fused_ce` needs GhostVis's `linear_cross_entropy` hook).
        rms_norm (`bool`, *optional*, defaults to `True`): Liger RMSNorm in the decoder.
        swiglu (`bool` or `"recompute"`, *optional*, defaults to `True`): Liger SiLU(gate) * up in the decoder MLPs;
            `"recompute"`: the MLP of `kernels.mlp`, whose backward makes the product again instead of keeping it
            (a third less MLP activation memory, one elementwise pass more).
        rope (`bool`, *optional*, defaults to `True`): Liger RoPE (process-wide for the family: see `kernels.liger`).
        fused_ce (`bool`, *optional*, defaults to `True`): fused linear cross-entropy in the head; training forwards
            with `labels` then return `logits=None`. TRL's `SFTTrainer` is unaffected: it calls the model with
            `fused_lm_head=True`, which runs its own chunked head on `model.base_model`.
        attention (`str` or `None`, *optional*, defaults to `"auto"`): see `kernels.attention.set_attention`;
            `None` leaves the attention alone.
        ce_chunk_mem_const (`int`, *optional*, defaults to 8): Liger fused-CE chunk budget (see `cross_entropy`).
        device (`str` or `torch.device`, *optional*): where the model will run, for a model still on the CPU that a
            trainer moves later (the recipes: `device="cuda"`); defaults to where its parameters are now.

    Returns:
        `dict[str, str]`: per swap, `"liger"`, `"torch"` (fallback), `"off"` or the attention implementation.
    """
    from . import liger as _liger

    ACTIVE.clear()
    on_cuda = next(model.parameters()).is_cuda if device is None else torch.device(device).type == "cuda"
    family = _liger.decoder_family(model)
    fast_layers = _compat.want_fast(on_cuda and liger_available() and family is not None, "Liger decoder kernels")
    if fast_layers and rms_norm:
        _liger.patch_rms_norm(model)
    if swiglu not in (True, False, "recompute"):
        raise ValueError(f"swiglu={swiglu!r}: True, False or 'recompute'")
    if fast_layers and swiglu:
        _liger.patch_swiglu(model, recompute=swiglu == "recompute")
    if fast_layers and rope:
        _liger.patch_rope(model)
    for name, wanted in (("rms_norm", rms_norm), ("swiglu", swiglu), ("rope", rope)):
        ACTIVE[name] = ("liger" if fast_layers else "torch") if wanted else "off"
    if fast_layers and swiglu == "recompute":
        ACTIVE["swiglu"] = "liger+recompute"
    if fused_ce:
        if not hasattr(model, "linear_cross_entropy"):
            raise ValueError(f"{type(model).__name__} has no `linear_cross_entropy` hook (GhostVis models only)")
        backend = "liger" if _compat.want_fast(on_cuda and liger_available(), "fused cross-entropy") else "torch"
        model.linear_cross_entropy = LinearCrossEntropy(backend, chunk_mem_const=ce_chunk_mem_const)
        ACTIVE["fused_ce"] = backend
    else:
        if hasattr(model, "linear_cross_entropy"):
            model.linear_cross_entropy = None
        ACTIVE["fused_ce"] = "off"
    if attention is not None:
        impl = set_attention(model, attention)
        ACTIVE["attention"] = impl["text"]
        ACTIVE["vision_attention"] = impl["vision"]
    return dict(ACTIVE)


def reset_kernels(model=None) -> None:
    """Undoes `apply_kernels`: stock RoPE for the whole process, and, given a model, its stock RMSNorm/SwiGLU, no
    fused cross-entropy and SDPA attention."""
    from . import liger as _liger
    from .attention import set_sdpa_priority

    _liger.unpatch_rope()
    set_sdpa_priority(False)
    if model is not None:
        _liger.unpatch_modules(model)
        if hasattr(model, "linear_cross_entropy"):
            model.linear_cross_entropy = None
        set_attention(model, "sdpa")
    ACTIVE.clear()


__all__ = [
    "ACTIVE",
    "apply_kernels",
    "reset_kernels",
    "force",
    "forced",
    "liger_available",
    "set_attention",
    "LinearCrossEntropy",
    "enable_gradient_checkpointing",
    "compile_decoder_layers",
    "fused_adamw",
    "cast_frozen_params",
]
