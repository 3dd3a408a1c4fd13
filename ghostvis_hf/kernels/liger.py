"""Liger RMSNorm / SwiGLU / RoPE on an already built Qwen2 or Llama text decoder, and how to undo them.

RMSNorm and SwiGLU are patched per instance (the module's `forward` is rebound, its weights untouched), like
Liger's own `_apply_liger_kernel_to_instance`, so other models in the process keep the stock modules.

RoPE cannot be patched per instance: transformers' attention calls the module-level `apply_rotary_pos_emb` of
`modeling_qwen2` / `modeling_llama`. Liger replaces that function for the whole module, and so do we; `unpatch_rope`
restores it. NOTE: this is process-wide for the model family (every Qwen2 model in the process gets Liger's RoPE)
until it is undone: it works around transformers having no per-instance RoPE hook; it can be removed once
`use_kernelized_func` (transformers' hub-kernel RoPE hook) is usable without the `kernels` package.
"""

import importlib

from torch import nn

SUPPORTED = {"qwen2": "transformers.models.qwen2.modeling_qwen2", "llama": "transformers.models.llama.modeling_llama"}
_original_rope: dict[str, object] = {}


def _decoder(model) -> nn.Module:
    inner = getattr(model, "model", model)
    decoder = getattr(inner, "language_model", None) or inner
    if not hasattr(decoder, "layers"):
        raise ValueError(f"{type(model).__name__} has no text decoder with `.layers`")
    return decoder


def decoder_family(model) -> str | None:
    """`"qwen2"`, `"llama"` or `None` (unsupported) for the model's text decoder."""
    model_type = getattr(_decoder(model).config, "model_type", None)
    return model_type if model_type in SUPPORTED else None


def patch_rms_norm(model) -> int:
    """Binds Liger's RMSNorm forward on every RMSNorm of the text decoder; returns how many were patched."""
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module

    decoder, n = _decoder(model), 0
    norms = [decoder.norm]
    norms += [m for layer in decoder.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    for norm in norms:
        # Qwen2/Llama RMSNorm: y = w * x / rms(x), computed in fp32 ("llama" casting), no offset
        _patch_rms_norm_module(norm, offset=0.0, eps=norm.variance_epsilon, casting_mode="llama", in_place=True)
        n += 1
    return n


def patch_swiglu(model, recompute: bool = False) -> int:
    """Binds Liger's fused SiLU(gate) * up forward on every decoder MLP, or with `recompute` the MLP of
    `kernels.mlp` (the product made again in the backward, with Liger's kernels); returns how many were patched."""
    from liger_kernel.transformers.monkey_patch import _patch_swiglu_module
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    from .mlp import patch_recompute_mlp

    n = 0
    for layer in _decoder(model).layers:
        mlp = layer.mlp
        if getattr(mlp.config, "hidden_act", "silu") not in ("silu", "swish") or getattr(mlp.config, "mlp_bias", False):
            continue
        if recompute:
            patch_recompute_mlp(mlp)
        else:
            _patch_swiglu_module(mlp, LigerSwiGLUMLP)
        n += 1
    return n


def patch_rope(model) -> str:
    """Swaps the family's module-level `apply_rotary_pos_emb` for Liger's (see the module NOTE)."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    family = decoder_family(model)
    module = importlib.import_module(SUPPORTED[family])
    _original_rope.setdefault(family, module.apply_rotary_pos_emb)
    module.apply_rotary_pos_emb = liger_rotary_pos_emb
    return family


def unpatch_rope() -> None:
    """Restores every module-level RoPE function `patch_rope` replaced."""
    for family, fn in list(_original_rope.items()):
        importlib.import_module(SUPPORTED[family]).apply_rotary_pos_emb = fn
        del _original_rope[family]


def unpatch_modules(model) -> None:
    """Undoes `patch_rms_norm` / `patch_swiglu` on this model (removes the instance-bound methods)."""
    for module in _decoder(model).modules():
        if "_get_name" in module.__dict__:  # only what Liger's _patch_* helpers bound
            for name in ("forward", "extra_repr", "_get_name"):
                module.__dict__.pop(name, None)
