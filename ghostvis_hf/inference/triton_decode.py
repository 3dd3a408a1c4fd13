"""Triton kernels for the engine's fused decode step (`fused_decoder.py`): one kernel per stage of a decoder layer.

A decode step moves every weight once for a handful of tokens, so its time is the weight bytes over the memory
bandwidth plus a fixed cost per kernel launched (a few microseconds even inside a CUDA graph). Stock `transformers`
runs ~15 kernels per layer (three separate q/k/v products, norms, RoPE, cache scatters, a masked SDPA call, ...);
these kernels do a layer in four or five:

- `linear`: `epilogue(rmsnorm?(x) @ W.T)` for a few rows of `x` (a matrix-vector kernel for one row, tensor-core
  tiles for more). The RMSNorm of the input is computed in
  the prologue (x is tiny; every program recomputes it), the epilogue adds a bias, a residual, or applies SwiGLU to a
  stacked `[gate; up]` weight. Used for q|k|v (norm + bias), o (+ residual), gate|up (norm + SwiGLU), down
  (+ residual) and the LM head (final norm). The weight may be int8 with one scale per output row
  (`ghostvis_hf.quantization.int8_weight_only`): each tile is converted in registers (int8 values are exact in
  bf16), the products accumulate in float32 and the row scales multiply the sums in the epilogue, before bias,
  SwiGLU and residual; the weight bytes moved per step halve. For several rows, narrow products with a long K (down:
  1,536 x 8,960) may share each output tile's K among up to 8 programs (split-K, chosen by the autotuner): the
  last program of a tile adds the float32 sums in split order and applies the epilogue (an H200 int8 step at batch
  32: 1.96 ms against 2.19 unsplit).
- `rope_attention`: rotary embedding of q and k, the write of k and v into the slot KV cache, and attention of one
  query token per row against its own slot's columns `0..position` (no mask tensor): grouped-query heads share each
  K/V load, online softmax, the columns split over several programs when rows x KV heads would not fill the GPU
  (flash-decoding), merged by a small `_combine_kernel`.

On Hopper and newer GPUs every kernel here but the several-row tensor-core product is launched with programmatic
dependent launch (PDL): it lets the next kernel of the stream start while this one runs (`gdc_launch_dependents`),
and waits (`gdc_wait`) for its predecessor to finish before touching anything the predecessor may write; the next
kernel's launch and start-up hide behind this one's tail, which at batch 1 is a large share of each of the ~170
kernels of a step (an H200 step of the 1.5b preset: 1.20 ms with it, 1.30 ms without; docs/benchmarks/
generate_notes.md). `GHOSTVIS_PDL=0` turns it off.

Rounding follows `transformers`' modules step by step (each bf16 intermediate is rounded where theirs is), so
outputs differ from stock only by accumulation order. Off CUDA they run only in Triton's interpreter (`TRITON_INTERPRET=1` before
Triton is imported: tests).
"""

import functools
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


@functools.lru_cache(maxsize=None)
def _pdl_supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _pdl(t: torch.Tensor) -> dict:
    """Launch options for programmatic dependent launch on `t`'s device (Hopper or newer, not interpreting, not
    turned off with `GHOSTVIS_PDL=0`): the kernels' `PDL` flag and Triton's `launch_pdl`."""
    on = (not INTERPRET and t.is_cuda and os.environ.get("GHOSTVIS_PDL", "1") != "0"
          and _pdl_supported(t.device.index if t.device.index is not None else torch.cuda.current_device()))
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


@_jit
def _pdl_prologue(PDL: tl.constexpr):
    """Start of every kernel here: let the next kernel launch now, and wait until the previous one has finished
    (its writes visible) before reading or writing any activation, cache or output."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@_jit
def _int8_to_f32(q):
    """int8 -> float32 without the conversion unit (a quarter of the FMA rate on Hopper, which would bind an int8
    matrix-vector product before memory does): q + 128 in the low bits of the float 2**23 is 2**23 + q + 128 exactly;
    subtracting 2**23 + 128 leaves q, in one integer add and one float add."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


def _autotune(configs, key, prune=None):
    """`triton.autotune` on CUDA; the interpreter takes the first config (timings would mean nothing there), and so
    does `GHOSTVIS_AUTOTUNE=0` (tests: each config is a compilation)."""
    if INTERPRET or os.environ.get("GHOSTVIS_AUTOTUNE", "1") == "0":
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
    return triton.autotune(configs=configs, key=key,
                           prune_configs_by=None if prune is None else {"early_config_prune": prune})


_DOT_CONFIGS = [  # M >= 2: tensor-core tiles, M padded to 16/32/64
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
        (16, 512, 8, 2), (32, 64, 4, 5), (128, 64, 4, 4), (128, 128, 8, 3), (64, 256, 8, 3), (64, 128, 8, 4),
    ]
] + [  # split-K: SPLIT_K programs share each output tile's K (narrow products would leave SMs idle)
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
    for bn, bk, w, s, sk in [
        (64, 128, 4, 3, 2), (64, 128, 4, 3, 4), (32, 128, 4, 4, 2), (32, 128, 4, 4, 4), (32, 128, 4, 4, 8),
        (128, 64, 4, 4, 4), (64, 256, 8, 3, 2), (16, 256, 4, 3, 4),
    ]
]
MAX_SPLIT_K = 8
DOT_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _DOT_CONFIGS)  # the most output tiles a split-K launch counts
SPLIT_K_MAX_N = 16384  # wider products (the LM head) have output tiles enough for every SM: never split


def _prune_split_k(configs, named_args, **kwargs):
    """Split-K configs only for products narrow enough to want them and with a K tile for every split."""
    n, k = named_args["N"], named_args["K"]
    return [c for c in configs if c.kwargs.get("SPLIT_K", 1) == 1
            or (n <= SPLIT_K_MAX_N and k >= c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"])]


_GEMV_CONFIGS = [  # M == 1: a few weight rows per program, reduced on CUDA cores
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (8, 256, 4, 3), (4, 512, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3), (4, 1024, 4, 2),
        (2, 1024, 4, 3), (32, 128, 4, 4), (1, 2048, 4, 3), (2, 2048, 8, 2), (4, 256, 4, 4), (8, 128, 4, 4),
        (16, 128, 4, 4), (8, 1024, 8, 2),
    ]
]


@_jit
def _rms_rstd(x_ptr, rows, row_ok, stride_x, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / RMS of each input row (x is a few rows: every program recomputes it)."""
    ks = tl.arange(0, BLOCK_K)
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        xt = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :],
                     other=0.0).to(tl.float32)
        sq += tl.sum(xt * xt, axis=1)
    return 1.0 / tl.sqrt(sq / K + eps)


@_jit
def _x_tile(x_ptr, rows, row_ok, stride_x, kk, k_ok, norm_ptr, rstd, dtype: tl.constexpr, NORM: tl.constexpr):
    """Columns `kk` of the input rows, RMS-normalised as transformers' RMSNorm rounds (normalise in fp32, round,
    multiply by the weight, round) when NORM."""
    xt = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if NORM:
        g = tl.load(norm_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        xt = (xt.to(tl.float32) * rstd[:, None]).to(dtype)
        xt = (g[None, :] * xt.to(tl.float32)).to(dtype)
    return xt


@_jit
def _epilogue(acc, acc_up, rows, cols, row_ok, col_ok, N, stride_out, scale_ptr, bias_ptr, res_ptr, out_ptr,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr, INT8: tl.constexpr):
    """Row scales (int8), bias, SwiGLU and residual on the float32 sums `[BLOCK_M, BLOCK_N]`, then the store."""
    dtype = out_ptr.dtype.element_ty
    if INT8:  # per-row scales of the int8 weight (the up rows' scales sit N below the gate rows')
        acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_up *= tl.load(scale_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
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


@_jit
def _gemv_step(part, wt, xv, INT8: tl.constexpr):
    """`part + w * x` element-wise, the weight tile in float32 (int8 through `_int8_to_f32`)."""
    if INT8:
        return part + _int8_to_f32(wt) * xv
    return part + wt.to(tl.float32) * xv


@_jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, norm_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K, stride_x, stride_out, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr, INT8: tl.constexpr, PDL: tl.constexpr,
):
    """One row: BLOCK_N weight rows per program, multiply-adds on CUDA cores (no padding of x to a tensor-core
    tile) into element-wise partial sums, reduced across threads once after the loop. The RMS statistics read the
    input row in blocks of NORM_BLOCK columns (the whole row of a few KB in one load: the products wait for them)."""
    pid_n = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    rows = tl.arange(0, 1)
    row_ok = rows < 1
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    # The weights do not depend on the previous kernel: the first tile is loaded before waiting for it (with PDL
    # this program may start while that kernel's last programs still run, and stream the weights meanwhile).
    k_ok = ks < K
    wt = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
    if SWIGLU:  # the up rows sit N rows below the gate rows of the stacked weight
        ut = tl.load(w_ptr + (cols[:, None] + N) * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
    _pdl_prologue(PDL)
    rstd = tl.zeros([1], dtype=tl.float32)
    if NORM:
        rstd = _rms_rstd(x_ptr, rows, row_ok, stride_x, K, eps, 1, NORM_BLOCK)
    xv = _x_tile(x_ptr, rows, row_ok, stride_x, ks, k_ok, norm_ptr, rstd, dtype, NORM).to(tl.float32)
    part = _gemv_step(tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), wt, xv, INT8)
    if SWIGLU:
        part_up = _gemv_step(tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), ut, xv, INT8)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        xv = _x_tile(x_ptr, rows, row_ok, stride_x, kk, k_ok, norm_ptr, rstd, dtype, NORM).to(tl.float32)
        wt = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
        part = _gemv_step(part, wt, xv, INT8)
        if SWIGLU:
            ut = tl.load(w_ptr + (cols[:, None] + N) * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :],
                         other=0)
            part_up = _gemv_step(part_up, ut, xv, INT8)
    acc = tl.sum(part, axis=1)[None, :]
    acc_up = acc
    if SWIGLU:
        acc_up = tl.sum(part_up, axis=1)[None, :]
    _epilogue(acc, acc_up, rows, cols, row_ok, col_ok, N, stride_out, scale_ptr, bias_ptr, res_ptr, out_ptr,
              HAS_BIAS, HAS_RES, SWIGLU, INT8)


@_jit
def _linear_kernel(
    x_ptr, w_ptr, scale_ptr, norm_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, stride_x, stride_out, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, SWIGLU: tl.constexpr, INT8: tl.constexpr, F32_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Several rows: tensor-core tiles (x padded to BLOCK_M rows). Launched without PDL (see `linear`).

    With `SPLIT_K > 1` the K columns are shared by SPLIT_K programs per output tile (grid axis 2): each writes its
    float32 sums to `part_ptr` (`[SPLIT_K, 2, M, N]`) and counts itself in `count_ptr` (one int32 per tile, zero
    before the launch); the last to arrive adds the SPLIT_K sums in split order (the result does not depend on
    which program finished last), applies the epilogue and sets the count back to zero for the next launch."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = out_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM:
        rstd = _rms_rstd(x_ptr, rows, row_ok, stride_x, K, eps, BLOCK_M, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = acc
    k_share = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # whole K tiles per split
    k_end = tl.minimum(split * k_share + k_share, K)
    for k0 in range(split * k_share, k_end, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < k_end
        xt = _x_tile(x_ptr, rows, row_ok, stride_x, kk, k_ok, norm_ptr, rstd, dtype, NORM)
        wt = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
        if INT8 and not F32_DOT:  # tensor-core operand: exact in bf16/fp16 (|q| <= 128)
            wt = wt.to(dtype)
        if F32_DOT:
            acc += tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(wt))
        if SWIGLU:  # the up rows sit N rows below the gate rows of the stacked weight
            ut = tl.load(w_ptr + (cols[:, None] + N) * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :],
                         other=0)
            if INT8 and not F32_DOT:
                ut = ut.to(dtype)
            if F32_DOT:
                acc_up += tl.dot(xt.to(tl.float32), tl.trans(ut.to(tl.float32)), input_precision="ieee")
            else:
                acc_up += tl.dot(xt, tl.trans(ut))
    if SPLIT_K == 1:
        _epilogue(acc, acc_up, rows, cols, row_ok, col_ok, N, stride_out, scale_ptr, bias_ptr, res_ptr, out_ptr,
                  HAS_BIAS, HAS_RES, SWIGLU, INT8)
    else:
        mask = row_ok[:, None] & col_ok[None, :]
        tile = rows[:, None] * N + cols[None, :]
        tl.store(part_ptr + (split * 2) * M * N + tile, acc, mask=mask)
        if SWIGLU:
            tl.store(part_ptr + (split * 2 + 1) * M * N + tile, acc_up, mask=mask)
        tl.debug_barrier()  # every thread's sums stored before the count (released with it) says so
        count = count_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(count, 1, sem="acq_rel") == SPLIT_K - 1:  # the last program of this tile
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = acc
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(part_ptr + (s * 2) * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    acc_up += tl.load(part_ptr + (s * 2 + 1) * M * N + tile, mask=mask, other=0.0,
                                      cache_modifier=".cg")
            tl.atomic_xchg(count, 0)
            _epilogue(acc, acc_up, rows, cols, row_ok, col_ok, N, stride_out, scale_ptr, bias_ptr, res_ptr,
                      out_ptr, HAS_BIAS, HAS_RES, SWIGLU, INT8)


_KEY = ["M", "N", "K", "NORM", "SWIGLU", "INT8"]
_linear_dot = _autotune(_DOT_CONFIGS, key=_KEY, prune=_prune_split_k)(_linear_kernel)
# device -> int32 counts of the split-K tiles, zero between launches (the last program of a tile resets its count);
# shared by the launches on a device, which must not run concurrently (the engine decodes on one stream)
_SPLIT_COUNTS = {}


def _split_counts(t: torch.Tensor, tiles: int) -> torch.Tensor:
    """Zeroed int32 counts for `tiles` output tiles on `t`'s device, kept across calls (each split-K launch leaves
    them zero). Made outside any CUDA graph capture when possible; one first made during a capture zeroes itself
    in that graph and is not kept."""
    counts = _SPLIT_COUNTS.get(t.device)
    if counts is None or counts.numel() < tiles:
        counts = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=t.device)
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            return counts
        _SPLIT_COUNTS[t.device] = counts
    return counts


_linear_gemv = _autotune(_GEMV_CONFIGS, key=_KEY)(_gemv_kernel)


def tuned_configs() -> dict:
    """The configs the autotuner has chosen so far in this process, per kernel and product:
    `{"one_row" | "several_rows": {"M=.. N=.. K=.. NORM SWIGLU INT8": {"BLOCK_N": .., ..., "num_warps": ..}}}`
    (benchmark records: which kernels ran). Empty where nothing was tuned (interpreter, `GHOSTVIS_AUTOTUNE=0`)."""
    out = {}
    for name, kernel in (("one_row", _linear_gemv), ("several_rows", _linear_dot)):
        chosen = {}
        for key, config in getattr(kernel, "cache", {}).items():
            shape = dict(zip(_KEY, key))
            label = " ".join([f"M={shape['M']} N={shape['N']} K={shape['K']}"]
                             + [flag for flag in ("NORM", "SWIGLU", "INT8") if shape[flag]])
            chosen[label] = {k: v for k, v in config.all_kwargs().items() if v is not None}
        out[name] = chosen
    return out


def _block_m(m: int) -> int:
    return 1 if m == 1 else 16 if m <= 16 else 32 if m <= 32 else 64


def linear(x, weight, norm_weight=None, eps=1e-6, bias=None, residual=None, swiglu=False, weight_scale=None,
           config=None):
    """`epilogue(rmsnorm(x) @ weight.T)` for a few rows.

    Args:
        x (`torch.Tensor` of shape `[M, K]`): rows contiguous in the last dimension.
        weight (`torch.Tensor` of shape `[N, K]`, or `[2N, K]` stacked `[gate; up]` with `swiglu=True`): in `x`'s
            dtype, or int8 with `weight_scale`.
        weight_scale (`torch.Tensor` of shape `[N]` (`[2N]` with `swiglu`), *optional*): the scale of each row of
            an int8 `weight` (symmetric: the row is `weight[n] * weight_scale[n]`); required for int8, refused
            otherwise.
        norm_weight (`torch.Tensor` of shape `[K]`, *optional*): apply RMSNorm (with `eps`) to `x` first.
        bias (`torch.Tensor` of shape `[N]`, *optional*), residual (`torch.Tensor` of shape `[M, N]`, *optional*):
            added to the output (bias before rounding, residual after, as `transformers`' modules do).
        swiglu (`bool`): return `silu(x @ gate.T) * (x @ up.T)`.
        config (`dict`, *optional*): the kernel's `BLOCK_N`, `BLOCK_K` (and with several rows `SPLIT_K`),
            `num_warps` and `num_stages` instead of the autotuned choice (tests, benchmarks).

    Returns:
        `torch.Tensor` of shape `[M, N]` in `x`'s dtype.

    With one row and programmatic dependent launch the kernel reads its first weight tile before waiting for the
    kernel launched just before it: `weight` must be a fixed tensor (model weights), not one that the previous kernel
    of this module (whose successor may start early) is still writing.
    """
    m, k = x.shape
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.is_contiguous(), (x.shape, weight.shape)
    int8 = weight.dtype == torch.int8
    if int8 != (weight_scale is not None):
        raise ValueError(f"weight_scale goes with an int8 weight and only with one (weight is {weight.dtype})")
    if int8 and (weight_scale.shape != (weight.shape[0],) or not weight_scale.is_contiguous()):
        raise ValueError(f"weight_scale must be contiguous of shape ({weight.shape[0]},), not {tuple(weight_scale.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride() == out.stride()
    bm = _block_m(m)
    args = (x, weight, weight_scale if int8 else x, norm_weight if norm_weight is not None else x,
            bias if bias is not None else x, residual if residual is not None else x, out, m, n, k, x.stride(0),
            out.stride(0), eps)
    flags = dict(NORM=norm_weight is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                 SWIGLU=swiglu, INT8=int8)
    if bm == 1:
        kernel = _linear_gemv if config is None else _gemv_kernel  # a given config instead of the autotuned choice
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            *args, NORM_BLOCK=min(triton.next_power_of_2(k), 8192), **flags, **_pdl(x), **(config or {}))
    else:  # no PDL: measured on an H200, int8 at batch 32 took 2.40 ms a step with it and 2.07 without (its programs
        # waiting for the previous kernel hold the shared memory the running tensor-core kernel pipelines through)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm), meta["SPLIT_K"])  # noqa: E731
        kernel = _linear_dot
        if config is not None:  # a given config instead of the autotuned choice
            kernel, flags = _linear_kernel, {"SPLIT_K": 1, **flags, **config}
            if flags["SPLIT_K"] > 1 and not _prune_split_k([triton.Config(config)], dict(N=n, K=k)):
                raise ValueError(f"SPLIT_K={flags['SPLIT_K']} is not for N={n}, K={k} (see _prune_split_k)")
        part = counts = x  # split-K's float32 sums [MAX_SPLIT_K, 2, M, N] and its tile counts, where it may run
        if n <= SPLIT_K_MAX_N:
            part = torch.empty(MAX_SPLIT_K * 2 * m * n, dtype=torch.float32, device=x.device)
            counts = _split_counts(x, triton.cdiv(n, DOT_MIN_BLOCK_N) * triton.cdiv(m, bm))
        kernel[grid](*args[:7], part, counts, *args[7:], BLOCK_M=bm, F32_DOT=INTERPRET or x.dtype == torch.float32,
                     **flags)
    return out


@_jit
def _attend_block(q, k, v, n_ok, m_i, l_i, acc, scale, dtype: tl.constexpr, F32_DOT: tl.constexpr):
    """Online-softmax update of (max, sum, output) of the query heads `q` with one block of cached keys/values
    (columns where `n_ok`)."""
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
    return m_new, l_i, acc


@_jit
def _rope_attention_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_ptr, ml_ptr, scale,
    stride_qkv, stride_cos, stride_cb, stride_ch, stride_cs, max_pos,
    H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr,
):
    row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    group: tl.constexpr = H // H_KV
    dtype = out_ptr.dtype.element_ty
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_ok = g < group
    heads = kv_head * group + g
    # Before waiting for the q|k|v product: the position, its cos/sin and this program's first block of cached
    # columns 0..pos-1 (positions are set before the step's first kernel, the cache by earlier steps; nothing this
    # step's kernels write), so their memory latency overlaps the product's tail.
    pos = tl.minimum(tl.maximum(tl.load(pos_ptr + row), 0), max_pos)
    cos = tl.load(cos_ptr + pos * stride_cos + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + d).to(tl.float32)
    # this program's share of the cached columns 0..pos-1 (column pos is the current token, held in registers)
    chunk = tl.cdiv(tl.cdiv(pos + 1, SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, pos + 1)
    stop = tl.minimum(end, pos)
    kv_base = row * stride_cb + kv_head * stride_ch
    cols = tl.arange(0, BLOCK_N)
    n = start + cols
    n_ok = n < stop
    offs = kv_base + n[:, None] * stride_cs + d[None, :]
    k = tl.load(k_cache_ptr + offs, mask=n_ok[:, None], other=0.0)
    v = tl.load(v_cache_ptr + offs, mask=n_ok[:, None], other=0.0)
    _pdl_prologue(PDL)

    # RoPE as transformers applies it: x*cos + rotate_half(x)*sin, each product rounded to the model dtype
    swap = (d + D // 2) % D  # rotate_half(x)[d] = -x[d + D/2] (first half), x[d - D/2] (second half)
    sign = tl.where(d < D // 2, -1.0, 1.0)
    base = qkv_ptr + row * stride_qkv
    q = tl.load(base + heads[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    q_sw = tl.load(base + heads[:, None] * D + swap[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    q = ((q * cos[None, :]).to(dtype).to(tl.float32)
         + (q_sw * sign[None, :] * sin[None, :]).to(dtype).to(tl.float32)).to(dtype)
    k_cur = tl.load(base + (H + kv_head) * D + d).to(tl.float32)
    k_sw = tl.load(base + (H + kv_head) * D + swap).to(tl.float32)
    k_cur = ((k_cur * cos).to(dtype).to(tl.float32) + (k_sw * sign * sin).to(dtype).to(tl.float32)).to(dtype)
    v_cur = tl.load(base + (H + H_KV + kv_head) * D + d)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    if start < stop:  # the block loaded before the wait (>= 1 cached column)
        m_i, l_i, acc = _attend_block(q, k, v, n_ok, m_i, l_i, acc, scale, dtype, F32_DOT)
    for s0 in range(start + BLOCK_N, stop, BLOCK_N):  # every further block holds >= 1 cached column
        n = s0 + cols
        n_ok = n < stop
        offs = kv_base + n[:, None] * stride_cs + d[None, :]
        k = tl.load(k_cache_ptr + offs, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=n_ok[:, None], other=0.0)
        m_i, l_i, acc = _attend_block(q, k, v, n_ok, m_i, l_i, acc, scale, dtype, F32_DOT)
    if (pos >= start) & (pos < end):  # the current token: attend to it and write it to the cache
        s_cur = tl.sum(q.to(tl.float32) * k_cur.to(tl.float32)[None, :], axis=1) * scale
        m_new = tl.maximum(m_i, s_cur)
        alpha = tl.exp(m_i - m_new)
        p_cur = tl.exp(s_cur - m_new)
        l_i = l_i * alpha + p_cur
        acc = acc * alpha[:, None] + p_cur.to(dtype).to(tl.float32)[:, None] * v_cur.to(tl.float32)[None, :]
        m_i = m_new
        tl.store(k_cache_ptr + kv_base + pos * stride_cs + d, k_cur)
        tl.store(v_cache_ptr + kv_base + pos * stride_cs + d, v_cur)
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + (row * H + heads)[:, None] * D + d[None, :], out.to(dtype), mask=g_ok[:, None])
    else:  # partial results; `_combine_kernel` merges the splits
        idx = (row * H + heads) * SPLITS + split
        tl.store(part_ptr + idx[:, None] * D + d[None, :], acc, mask=g_ok[:, None])
        tl.store(ml_ptr + idx * 2, m_i, mask=g_ok)
        tl.store(ml_ptr + idx * 2 + 1, l_i, mask=g_ok)


@_jit
def _combine_kernel(part_ptr, ml_ptr, out_ptr, SPLITS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    _pdl_prologue(PDL)
    head_row = tl.program_id(0)  # row * H + head
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    m = tl.load(ml_ptr + (head_row * SPLITS + sp) * 2)
    l_s = tl.load(ml_ptr + (head_row * SPLITS + sp) * 2 + 1)
    w = tl.exp(m - tl.max(m, axis=0))  # empty splits: m = -inf, weight 0
    part = tl.load(part_ptr + (head_row * SPLITS + sp)[:, None] * D + d[None, :])
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    tl.store(out_ptr + head_row * D + d, out.to(out_ptr.dtype.element_ty))


# Cached columns per block of `rope_attention` (its K/V tile), which `attention_splits` counts in.
ATTENTION_BLOCK_N = 32


def attention_splits(rows: int, num_kv_heads: int, max_seq_len: int, block_n: int = ATTENTION_BLOCK_N,
                     target: int = 256) -> int:
    """How many programs share one row's columns (a power of two): one per block of `block_n` columns where that
    keeps the programs in all within `target` (and at most 32 per row and KV head), else as many as fit. With one
    block each, a program loads all its cached columns before waiting for the q|k|v product; an H200 step of the
    1.5b preset at 384 columns took 1.137 ms with 8 splits (two blocks for some) and 1.089 ms with 16."""
    fill = max(1, min(target // max(1, rows * num_kv_heads), 32))
    return min(triton.next_power_of_2(triton.cdiv(max_seq_len, block_n)), 1 << (fill.bit_length() - 1))


def rope_attention(qkv, cos, sin, positions, k_cache, v_cache, num_heads: int, scale: float, splits: int = 1):
    """Decode attention for one new token per row, rotary embedding and cache write included.

    Row `i` of `qkv` (`[M, (H + 2 H_kv) D]`, the output of the q|k|v projection) is at `positions[i]`: its q and k
    are rotated with `cos`/`sin` (`[max_seq, D]`), its k and v written to row `i` of the caches
    (`[max_batch, H_kv, max_seq, D]`) at that column, and its query heads attend to columns `0..positions[i]`
    (grouped-query heads share each K/V load; `splits` programs share a row's columns, merged afterwards).

    Returns:
        `torch.Tensor` of shape `[M, H * D]`.
    """
    m = qkv.shape[0]
    h_kv, d = k_cache.shape[1], k_cache.shape[-1]
    out = torch.empty(m, num_heads * d, dtype=qkv.dtype, device=qkv.device)
    part = ml = out
    if splits > 1:
        part = torch.empty(m * num_heads * splits, d, dtype=torch.float32, device=qkv.device)
        ml = torch.empty(m * num_heads * splits, 2, dtype=torch.float32, device=qkv.device)
    f32, pdl = INTERPRET or qkv.dtype == torch.float32, _pdl(qkv)
    _rope_attention_kernel[(m, h_kv, splits)](
        qkv, cos, sin, positions, k_cache, v_cache, out, part, ml, scale,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[2] - 1,
        H=num_heads, H_KV=h_kv, D=d, BLOCK_G=max(16, triton.next_power_of_2(num_heads // h_kv)),
        BLOCK_N=ATTENTION_BLOCK_N,
        SPLITS=splits, F32_DOT=f32, **pdl,
    )
    if splits > 1:
        _combine_kernel[(m * num_heads,)](part, ml, out, SPLITS=splits, D=d, **pdl)
    return out


@_jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, K, stride_x, eps, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    _pdl_prologue(PDL)
    row = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    k = tl.arange(0, BLOCK_K)
    ok = k < K
    x = tl.load(x_ptr + row * stride_x + k, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)
    w = tl.load(w_ptr + k, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * K + k, (w * (x * rstd).to(dtype).to(tl.float32)).to(dtype), mask=ok)


def rmsnorm(x, weight, eps: float):
    """`transformers`' RMSNorm of each row of `x` (`[M, K]`, K up to a few thousand), rounded as it rounds."""
    m, k = x.shape
    out = torch.empty(m, k, dtype=x.dtype, device=x.device)
    _rmsnorm_kernel[(m,)](x, weight, out, k, x.stride(0), eps, BLOCK_K=triton.next_power_of_2(k), **_pdl(x))
    return out


@_jit
def _swiglu_kernel(gu_ptr, out_ptr, N, stride_gu, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_prologue(PDL)
    row, block = tl.program_id(0), tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    n = block * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    gate = tl.load(gu_ptr + row * stride_gu + n, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + N + n, mask=ok, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype)
    tl.store(out_ptr + row * N + n, (act.to(tl.float32) * up).to(dtype), mask=ok)


def swiglu(gate_up):
    """`silu(gate) * up` for `gate_up = [gate | up]` (`[M, 2N]`), rounded as `transformers`' MLP rounds."""
    m, n2 = gate_up.shape
    out = torch.empty(m, n2 // 2, dtype=gate_up.dtype, device=gate_up.device)
    _swiglu_kernel[(m, triton.cdiv(n2 // 2, 1024))](gate_up, out, n2 // 2, gate_up.stride(0), BLOCK=1024,
                                                     **_pdl(gate_up))
    return out
