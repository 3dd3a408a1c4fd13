"""Memory levers for training GhostVis: activation checkpointing on both towers, compiled decoder layers, fused AdamW,
and bf16 storage for frozen weights.

Where the memory of a full fine-tune goes (fp32 master weights + bf16 autocast + AdamW, 2.0B parameters):
16 bytes/param of weights, gradients and Adam moments (32 GB) that no kernel changes, plus activations (about 20 GB
for 4 x 2048 tokens through Qwen2-1.5B) and the `[tokens, vocab]` logits (several GB in fp32). The fused
cross-entropy removes the logits and Liger's RMSNorm/SwiGLU shrink the activations; checkpointing removes most of
the rest at the price of one more forward of each checkpointed layer.
"""

import torch
from torch import nn


def _base(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _towers(model):
    """`(vision_tower, language_model)` of a GhostVis/LLaVA-like model, PEFT-wrapped or not."""
    base = _base(model)
    inner = getattr(base, "model", base)
    return getattr(inner, "vision_tower", None), getattr(inner, "language_model", None)


def enable_gradient_checkpointing(model, vision: bool = True, text: bool = True, use_reentrant: bool = False,
                                  every_n_layers: int = 1) -> dict[str, int]:
    """Turns on activation checkpointing in the vision tower and/or the text decoder.

    `model.gradient_checkpointing_enable()` already reaches both towers (every `GradientCheckpointingLayer`: SigLIP
    encoder layers and decoder layers); this also lets one tower opt out, and makes the inputs of both towers
    require grad. That is the known pitfall with frozen towers (LoRA, or a frozen vision tower with a trainable
    projector): with reentrant checkpointing, a checkpointed segment whose inputs don't require grad returns no
    gradients, so LoRA weights inside a frozen SigLIP get none. transformers hooks the text embeddings only on some
    releases; we hook the vision patch embeddings too.

    Args:
        model: a GhostVis model (or a PEFT model wrapping one).
        vision (`bool`, *optional*, defaults to `True`): checkpoint the vision tower's encoder layers.
        text (`bool`, *optional*, defaults to `True`): checkpoint the decoder layers.
        use_reentrant (`bool`, *optional*, defaults to `False`): `torch.utils.checkpoint`'s flag.
        every_n_layers (`int`, *optional*, defaults to 1): checkpoint every n-th layer of each tower only.

    Returns:
        `dict[str, int]`: number of checkpointed layers per tower.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = _base(model)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    counts = {}
    vision_tower, text_model = _towers(base)
    for name, tower, on in (("vision", vision_tower, vision), ("text", text_model, text)):
        layers = [m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer)] if tower is not None else []
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = on and i % every_n_layers == 0
        counts[name] = sum(layer.gradient_checkpointing for layer in layers)
    if hasattr(base, "config"):
        base.config.use_cache = False
    _hook_input_embeddings(base)
    return counts


def _make_output_require_grad(module, inputs, output):
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def _hook_input_embeddings(model) -> None:
    if getattr(model, "_ghostvis_input_grad_hooks", None):
        return
    hooks = []
    vision, text = _towers(model)
    for tower in (vision, text):
        emb = tower.get_input_embeddings() if tower is not None else None
        if emb is not None:
            hooks.append(emb.register_forward_hook(_make_output_require_grad))
    model._ghostvis_input_grad_hooks = hooks


def compile_decoder_layers(model, vision: bool = False, **compile_kwargs) -> int:
    """`torch.compile`s each decoder layer in place (regional compilation: 1 graph reused by every layer, so the
    compile costs one layer, not 28), and with `vision=True` each vision encoder layer too. Returns how many layers
    were compiled. Calling it again recompiles with the new `compile_kwargs`.

    Inductor then fuses RMSNorm, RoPE, SiLU * up and the residual adds itself, so apply it *instead of* the Liger
    RMSNorm/SwiGLU/RoPE swaps (`apply_kernels(..., rms_norm=False, swiglu=False, rope=False)`); the fused
    cross-entropy and the attention choice are outside the layers and still apply. Varying packed lengths recompile
    with dynamic shapes after the second distinct length (`dynamic=None`, torch's default).

    Args:
        model: a GhostVis model.
        vision (`bool`, *optional*, defaults to `False`): also compile the vision tower's encoder layers.
        **compile_kwargs: passed to `nn.Module.compile` (e.g. `mode="reduce-overhead"`: CUDA graphs per layer, for
            fixed shapes; the training loop then calls `torch.compiler.cudagraph_mark_step_begin()` every step).
    """
    vision_tower, text = _towers(model)
    # NOTE: one graph serves every layer when dynamo inlines nn.Modules (parameters become inputs); if a release
    # specialises per layer instead, the default limit of 8 recompiles would silently leave the rest eager.
    layers = list(text.layers)
    if vision and vision_tower is not None:
        layers += next((list(m) for n, m in vision_tower.named_modules()
                        if n.endswith("layers") and isinstance(m, nn.ModuleList)), [])
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers))
    for layer in layers:
        layer.compile(**compile_kwargs)
    if torch.cuda.is_available():
        from .attention import set_sdpa_priority

        set_sdpa_priority(True)  # compiled regions skip the per-call sdpa_kernel context
    return len(layers)


def fused_adamw(model_or_params, lr: float = 1e-5, weight_decay: float = 0.0, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused multi-tensor CUDA kernel where possible (`optim="adamw_torch_fused"` in a TRL config is
    the same optimizer). Only parameters that require grad are optimised; state is fp32 for fp32 parameters."""
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    params = [p for p in params if p.requires_grad]
    fused = all(p.is_cuda for p in params) and len(params) > 0
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused, **kwargs)


def cast_frozen_params(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Stores frozen matmul weights (`nn.Linear`, `nn.Conv2d`, `nn.Embedding`) in `dtype`; returns bytes saved.

    Safe under bf16 autocast: autocast rounds those weights to bf16 on every forward anyway, so storing them in bf16
    changes no result, and frozen weights have no optimizer state or master copy to keep in fp32. Norms, biases and
    trainable parameters stay as they are (fp32 master weights for everything AdamW updates).
    NOTE: pure-bf16 *trainable* weights with fp32 Adam moments are not offered: an update smaller than bf16's
    resolution (about 1/256 of the weight) is lost, which is exactly the regime of a 1e-5 learning rate.
    """
    saved = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            w = module.weight
            if not w.requires_grad and w.dtype != dtype and w.is_floating_point():
                saved += w.numel() * (w.element_size() - torch.empty((), dtype=dtype).element_size())
                module.weight.data = w.data.to(dtype)
    return saved
