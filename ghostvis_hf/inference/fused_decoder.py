"""`FusedDecoder`: the engine's decode step for Qwen2/Llama-style decoders with Triton kernels: 4-5 per layer for
one row, cuBLAS products with Triton norm / SwiGLU / attention kernels between them for several rows.

It reads the model's own weights; q|k|v and gate|up are stacked once into one contiguous matrix each, and the
model's `Linear` modules are pointed at row slices of it, so nothing is stored twice and the `transformers` forward
(prefill, stock `generate`) keeps working on the same numbers. The KV cache is the engine's `SlotKVCache`: row `i`
of a step is slot `i`, written at `positions[i]`.

Int8 weight-only decoders (`--quantize int8`: torchao's per-row int8, `ghostvis_hf.quantization.int8_weight_only`)
run the same step on their int8 data, stacked the same way (each `Int8Tensor` is pointed at its rows), with the row
scales in a small copy in the model dtype; every product is then a Triton kernel, for several rows too (cuBLAS has no
bf16 x int8 product), and the LM head stays a float product.

Supported: decoders whose layers have `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` with SiLU,
`input_layernorm`/`post_attention_layernorm` RMSNorms, no sliding-window layers and no per-head q/k norms, a
power-of-two head dimension, float or int8 weight-only projections. `unsupported_reason` says why another decoder is
not.
"""

import torch

from ..quantization import int8_weight_only
from .kv_cache import SlotKVCache

_PROJECTIONS = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]


def _weight_kind(weight) -> str | None:
    """`"int8"` (int8 weight-only), `"float"` (a plain float tensor), or `None` (another quantization)."""
    if int8_weight_only(weight) is not None:
        return "int8"
    if type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype.is_floating_point:
        return "float"
    return None


def unsupported_reason(language_model) -> str | None:
    """Why the fused decode step cannot run this decoder, or `None` if it can."""
    config = language_model.config
    layers = getattr(language_model, "layers", None)
    if layers is None or not hasattr(language_model, "rotary_emb") or not hasattr(language_model, "norm"):
        return f"{type(language_model).__name__} has no layers/rotary_emb/norm"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act!r} (only silu)"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "sliding-window layers"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim & (head_dim - 1):
        return f"head_dim={head_dim} is not a power of two"
    kinds = set()
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or any(
            not isinstance(getattr(getattr(layer, m), n, None), torch.nn.Linear) for m, n in _PROJECTIONS
        ):
            return "a layer without plain Linear q/k/v/o and gate/up/down projections (quantized?)"
        kinds |= {_weight_kind(getattr(getattr(layer, m), n).weight) for m, n in _PROJECTIONS}
        if None in kinds:
            return "quantized projections other than int8 weight-only (bitsandbytes, torchao per-group, ...)"
        if len(kinds) > 1:
            return "some projections int8 and some not"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "per-head q/k norms"
        if attn.o_proj.bias is not None or mlp.down_proj.bias is not None or mlp.gate_proj.bias is not None:
            return "biases on o/gate/up/down projections"
    if language_model.embed_tokens.weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {language_model.embed_tokens.weight.dtype}"
    return None


def _stack(modules: list[torch.nn.Linear], attr: str) -> torch.Tensor | None:
    """Stacks the modules' `attr` (weight or bias) into one tensor and points each module at its slice."""
    parts = [getattr(m, attr) for m in modules]
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError(f"some projections have a {attr} and some do not")
    return _stack_parts(parts, [lambda v, p=p: setattr(p, "data", v) for p in parts])


def _stack_int8(modules: list[torch.nn.Linear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks the modules' int8 weight data (each weight pointed at its rows) and copies their row scales, in
    `dtype`, into one vector: `([N, K] int8, [N] scales)`."""
    weights = [m.weight for m in modules]
    parts = [int8_weight_only(w) for w in weights]
    qdata = _stack_parts([q for q, _ in parts], [lambda v, w=w: setattr(w, "qdata", v) for w in weights])
    return qdata, torch.cat([s for _, s in parts]).to(dtype)


def _stack_parts(parts: list[torch.Tensor], assign) -> torch.Tensor:
    """One tensor of `parts` stacked along dim 0; `assign[i](view)` points the i-th owner at its rows. Parts that
    already sit back to back in one storage (stacked by an earlier engine) are returned as a view, not copied."""
    first, total = parts[0], sum(p.shape[0] for p in parts)
    offsets = [first.storage_offset()]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + p.numel())
    if all(p.is_contiguous() and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
           and p.storage_offset() == o for p, o in zip(parts, offsets)):  # stacked by an earlier engine
        return first.as_strided((total, *first.shape[1:]), first.stride())
    stacked = torch.cat([p.detach() for p in parts])
    row = 0
    for put, p in zip(assign, parts):
        put(stacked[row : row + p.shape[0]])
        row += p.shape[0]
    return stacked


class FusedDecoder:
    """One decode step of `language_model` + `lm_head` with the kernels of `triton_decode`.

    Args:
        language_model: the `transformers` decoder (`model.model.language_model`).
        lm_head (`torch.nn.Linear`)
        cache (`SlotKVCache`): the engine's KV cache (filled by prefill, written here at each step).
    """

    def __init__(self, language_model, lm_head, cache: SlotKVCache):
        reason = unsupported_reason(language_model)
        if reason:
            raise ValueError(f"fused decoding does not support this decoder: {reason}")
        from . import triton_decode

        self.kernels = triton_decode
        self.num_heads = language_model.config.num_attention_heads
        self.num_kv_heads, self.head_dim = cache.keys[0].shape[1], cache.keys[0].shape[-1]  # as the cache was sized
        self.embed = language_model.embed_tokens
        self.cache = cache
        self.lm_head_weight = lm_head.weight
        if lm_head.bias is not None:
            raise ValueError("fused decoding does not support an lm_head bias")
        if _weight_kind(lm_head.weight) != "float":
            raise ValueError("fused decoding needs an unquantized lm_head")
        self.final_norm = (language_model.norm.weight, language_model.norm.variance_epsilon)
        dtype = self.embed.weight.dtype
        self.int8 = int8_weight_only(language_model.layers[0].self_attn.q_proj.weight) is not None
        self.layers = []
        with torch.no_grad():
            for layer in language_model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                if self.int8:  # (int8 data, row scales) per product
                    products = dict(qkv=_stack_int8([attn.q_proj, attn.k_proj, attn.v_proj], dtype),
                                    o=_stack_int8([attn.o_proj], dtype),
                                    gate_up=_stack_int8([mlp.gate_proj, mlp.up_proj], dtype),
                                    down=_stack_int8([mlp.down_proj], dtype))
                else:
                    products = dict(qkv=(_stack([attn.q_proj, attn.k_proj, attn.v_proj], "weight"), None),
                                    o=(attn.o_proj.weight.contiguous(), None),
                                    gate_up=(_stack([mlp.gate_proj, mlp.up_proj], "weight"), None),
                                    down=(mlp.down_proj.weight.contiguous(), None))
                self.layers.append(dict(
                    **{name: w for name, (w, _) in products.items()},
                    **{f"{name}_scale": s for name, (_, s) in products.items()},
                    qkv_bias=_stack([attn.q_proj, attn.k_proj, attn.v_proj], "bias"),
                    ln1=layer.input_layernorm.weight, eps1=layer.input_layernorm.variance_epsilon,
                    ln2=layer.post_attention_layernorm.weight, eps2=layer.post_attention_layernorm.variance_epsilon,
                    scale=getattr(attn, "scaling", self.head_dim**-0.5),
                ))
            # cos/sin for every position, from the decoder's own rotary module (any rope scaling it implements)
            weight = self.embed.weight
            positions = torch.arange(cache.max_seq_len, device=weight.device)[None]
            probe = torch.zeros(1, 1, 1, dtype=weight.dtype, device=weight.device)
            cos, sin = language_model.rotary_emb(probe, positions)
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [max_seq, head_dim]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits `[B, V]` for `tokens` (`[B]`) at `positions` (`[B]`); row `i` reads and writes cache slot `i`.

        One row: every product is a Triton matrix-vector kernel with the norm / bias / SwiGLU / residual fused in.
        Several rows: the products are cuBLAS matrix multiplications (faster than Triton tiles there; bias and
        residual ride in `addmm`), with Triton RMSNorm and SwiGLU kernels between them. (`addmm` adds the residual
        before rounding the product, one rounding fewer than `transformers`' eager modules.) Int8 weights: Triton
        kernels for every row count (tensor-core tiles for several rows), the LM head as for float weights.
        """
        k = self.kernels
        h = self.embed(tokens)  # [B, d]
        splits = k.attention_splits(tokens.shape[0], self.num_kv_heads, self.cache.max_seq_len)
        one_row = tokens.shape[0] == 1
        fused = one_row or self.int8  # products as `linear` kernels with the norm / epilogue inside
        for i, w in enumerate(self.layers):
            if fused:
                qkv = k.linear(h, w["qkv"], norm_weight=w["ln1"], eps=w["eps1"], bias=w["qkv_bias"],
                               weight_scale=w["qkv_scale"])
            else:
                x = k.rmsnorm(h, w["ln1"], w["eps1"])
                qkv = x @ w["qkv"].t() if w["qkv_bias"] is None else torch.addmm(w["qkv_bias"], x, w["qkv"].t())
            attn = k.rope_attention(qkv, self.cos, self.sin, positions, self.cache.keys[i], self.cache.values[i],
                                    self.num_heads, w["scale"], splits)
            if fused:
                h = k.linear(attn, w["o"], residual=h, weight_scale=w["o_scale"])
                act = k.linear(h, w["gate_up"], norm_weight=w["ln2"], eps=w["eps2"], swiglu=True,
                               weight_scale=w["gate_up_scale"])
                h = k.linear(act, w["down"], residual=h, weight_scale=w["down_scale"])
            else:
                h = torch.addmm(h, attn, w["o"].t())
                act = k.swiglu(k.rmsnorm(h, w["ln2"], w["eps2"]) @ w["gate_up"].t())
                h = torch.addmm(h, act, w["down"].t())
        norm_weight, eps = self.final_norm
        if one_row:
            return k.linear(h, self.lm_head_weight, norm_weight=norm_weight, eps=eps)
        return k.rmsnorm(h, norm_weight, eps) @ self.lm_head_weight.t()
