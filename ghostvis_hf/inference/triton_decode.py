"""Triton kernels for the engine's fused decode step (`fused_decoder.py`): one kernel per stage of a decoder layer.

A decode step moves every weight once for a handful of tokens, so its time is the weight bytes over the memory
bandwidth plus a fixed cost per kernel launched (a few microseconds even inside a CUDA graph). Stock `transformers`
runs ~15 kernels per layer (three separate q/k/v products, norms, RoPE, cache scatters, a masked SDPA call, ...);
these kernels do a layer in five:

- `linear`: `epilogue(rmsnorm?(x) @ W.T)` for a few rows of `x` (M <= 64). The RMSNorm of the input is computed in
  the prologue (x is tiny; every program recomputes it), the epilogue adds a bias, a residual, or applies SwiGLU to a
  stacked `[gate; up]` weight. Used for q|k|v (norm + bias), o (+ residual), gate|up (norm + SwiGLU), down
  (+ residual) and the LM head (final norm).
- `rope_and_cache`: rotary embedding of q and k, and the write of k and v into the slot KV cache.
- `decode_attention`: one query token per row against its own slot's cache, grouped-query heads sharing each K/V
  load, online softmax, reading only columns `0..position` (no mask tensor).

Rounding follows `transformers`' modules step by step (each bf16 intermediate is rounded where theirs is), so
outputs differ from stock only by accumulation order. Off CUDA they run only in Triton's interpreter (`TRITON_INTERPRET=1` before
Triton is imported: tests).
"""

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (`TRITON_INTERPRET=1` set before Triton was imported)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = interpreting()
_jit = triton.jit


def _autotune(configs, key):
    """`triton.autotune` on CUDA; the interpreter takes the first config (timings would mean nothing there)."""
    if INTERPRET:
        first = configs[0]

        def wrap(fn):
            def call(grid):
                def launch(*args, **kwargs):
                    meta = {**first.kwargs, **kwargs}
                    g = grid(meta) if callable(grid) else grid
                    return fn[g](*args, **meta)

                return launch

            return type("_Fixed", (), {"__getitem__": lambda self, grid: call(grid)})()

        return wrap
    return triton.autotune(configs=configs, key=key)


_LINEAR_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
        (16, 512, 8, 2), (32, 64, 4, 5),
    ]
]


@_autotune(_LINEAR_CONFIGS, key=["M", "N", "K", "BLOCK_M", "NORM", "SWIGLU"])
@_jit
def _linear_kernel(
    x_ptr, w_ptr, norm_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K, stride_x, stride_out, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)

    if NORM:  # RMSNorm statistics of the input rows (x is a few rows: every program recomputes them)
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            xt = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :],
                         other=0.0).to(tl.float32)
            sq += tl.sum(xt * xt, axis=1)
        rstd = 1.0 / tl.sqrt(sq / K + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SWIGLU:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        xt = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:  # as transformers' RMSNorm: normalise in fp32, round, then multiply by the weight and round
            g = tl.load(norm_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            xt = (xt.to(tl.float32) * rstd[:, None]).to(dtype)
            xt = (g[None, :] * xt.to(tl.float32)).to(dtype)
        wt = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if F32_DOT:
            acc += tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(wt))
        if SWIGLU:  # the up rows sit N rows below the gate rows of the stacked weight
            ut = tl.load(w_ptr + (cols[:, None] + N) * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :],
                         other=0.0)
            if F32_DOT:
                acc_up += tl.dot(xt.to(tl.float32), tl.trans(ut.to(tl.float32)), input_precision="ieee")
            else:
                acc_up += tl.dot(xt, tl.trans(ut))

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if SWIGLU:  # silu(gate) * up, each rounded as the eager modules round it
        gate = y.to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype)
        y = (act.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + rows[:, None] * stride_out + cols[None, :], mask=mask, other=0.0)
        y = (res.to(tl.float32) + y.to(tl.float32)).to(dtype)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y, mask=mask)


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def linear(x, weight, norm_weight=None, eps=1e-6, bias=None, residual=None, swiglu=False):
    """`epilogue(rmsnorm(x) @ weight.T)` for a few rows.

    Args:
        x (`torch.Tensor` of shape `[M, K]`): rows contiguous in the last dimension.
        weight (`torch.Tensor` of shape `[N, K]`, or `[2N, K]` stacked `[gate; up]` with `swiglu=True`).
        norm_weight (`torch.Tensor` of shape `[K]`, *optional*): apply RMSNorm (with `eps`) to `x` first.
        bias (`torch.Tensor` of shape `[N]`, *optional*), residual (`torch.Tensor` of shape `[M, N]`, *optional*):
            added to the output (bias before rounding, residual after, as `transformers`' modules do).
        swiglu (`bool`): return `silu(x @ gate.T) * (x @ up.T)`.

    Returns:
        `torch.Tensor` of shape `[M, N]` in `x`'s dtype.
    """
    m, k = x.shape
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.is_contiguous(), (x.shape, weight.shape)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride() == out.stride()
    bm = _block_m(m)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm))  # noqa: E731
    _linear_kernel[grid](
        x, weight, norm_weight if norm_weight is not None else x, bias if bias is not None else x,
        residual if residual is not None else x, out, m, n, k, x.stride(0), out.stride(0), eps,
        BLOCK_M=bm, NORM=norm_weight is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        SWIGLU=swiglu, F32_DOT=INTERPRET or x.dtype == torch.float32,
    )
    return out


@_jit
def _rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    stride_qkv, stride_cs, stride_cb, stride_ch, stride_cs_pos, max_pos,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr,
):
    row, head = tl.program_id(0), tl.program_id(1)
    dtype = q_out_ptr.dtype.element_ty
    half = tl.arange(0, D // 2)
    pos = tl.minimum(tl.maximum(tl.load(pos_ptr + row), 0), max_pos)
    base = qkv_ptr + row * stride_qkv + head * D
    x1 = tl.load(base + half).to(tl.float32)
    x2 = tl.load(base + D // 2 + half).to(tl.float32)
    if head < H + H_KV:  # q or k head: rotate. As transformers: q*cos + rotate_half(q)*sin, each product rounded
        c1 = tl.load(cos_ptr + pos * stride_cs + half).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * stride_cs + D // 2 + half).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * stride_cs + half).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * stride_cs + D // 2 + half).to(tl.float32)
        lo = ((x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)).to(dtype)
        hi = ((x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)).to(dtype)
        if head < H:
            dst = q_out_ptr + (row * H + head) * D
        else:
            dst = k_cache_ptr + row * stride_cb + (head - H) * stride_ch + pos * stride_cs_pos
        tl.store(dst + half, lo)
        tl.store(dst + D // 2 + half, hi)
    else:  # v head: copy into the cache
        dst = v_cache_ptr + row * stride_cb + (head - H - H_KV) * stride_ch + pos * stride_cs_pos
        tl.store(dst + half, x1.to(dtype))
        tl.store(dst + D // 2 + half, x2.to(dtype))


def rope_and_cache(qkv, cos, sin, positions, k_cache, v_cache, num_heads: int, num_kv_heads: int):
    """Rotates q and k of `qkv` (`[M, (H + 2 H_kv) D]`) at `positions` (`[M]`), writes k and v into row `i` of the
    caches (`[max_batch, H_kv, max_seq, D]`) at column `positions[i]`; returns the rotated q, `[M, H, D]`."""
    m = qkv.shape[0]
    d = k_cache.shape[-1]
    q = torch.empty(m, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(m, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, positions, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[2] - 1,
        H=num_heads, H_KV=num_kv_heads, D=d,
    )
    return q


@_jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, scale,
    stride_cb, stride_ch, stride_cs, max_pos,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    row, kv_head = tl.program_id(0), tl.program_id(1)
    group: tl.constexpr = H // H_KV
    dtype = out_ptr.dtype.element_ty
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_ok = g < group
    heads = kv_head * group + g
    q = tl.load(q_ptr + (row * H + heads)[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0)
    pos = tl.minimum(tl.maximum(tl.load(pos_ptr + row), 0), max_pos)
    kv_base = row * stride_cb + kv_head * stride_ch
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, pos + 1, BLOCK_N):
        n = start + cols
        n_ok = n <= pos
        offs = kv_base + n[:, None] * stride_cs + d[None, :]
        k = tl.load(k_cache_ptr + offs, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=n_ok[:, None], other=0.0)
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if F32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + (row * H + heads)[:, None] * D + d[None, :], out.to(dtype), mask=g_ok[:, None])


def decode_attention(q, k_cache, v_cache, positions, scale: float):
    """Row `i`'s query heads (`q`: `[M, H, D]`) attend to columns `0..positions[i]` of cache row `i`; `[M, H * D]`."""
    m, h, d = q.shape
    h_kv = k_cache.shape[1]
    out = torch.empty(m, h * d, dtype=q.dtype, device=q.device)
    block_g = max(16, triton.next_power_of_2(h // h_kv))
    _decode_attention_kernel[(m, h_kv)](
        q, k_cache, v_cache, positions, out, scale,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[2] - 1,
        H=h, H_KV=h_kv, D=d, BLOCK_G=block_g, BLOCK_N=64, F32_DOT=INTERPRET or q.dtype == torch.float32,
    )
    return out
