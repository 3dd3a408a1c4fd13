"""What fast kernels this process can use, what is active, and a switch that forces either path.

Imitates nanochat's `flash_attention.py`: detect once, expose a module-level flag, let tests override it.
Nothing here imports liger-kernel or triton: on a CPU machine (no CUDA, maybe no triton) importing
`ghostvis_hf.kernels` must stay cheap and must never fail. Liger is imported only inside `apply_kernels`, on CUDA.

The switch:
- `GHOSTVIS_KERNELS=fallback` (environment) or `force("fallback")`: every swap uses its plain-PyTorch path.
- `GHOSTVIS_KERNELS=fast` or `force("fast")`: a swap whose fast kernel is missing raises instead of falling back.
- unset / `force(None)`: fast kernels where available, fallbacks elsewhere (the default).
"""

import contextlib
import importlib.util
import inspect
import os

import torch

_MODES = ("fallback", "fast")
_force: str | None = os.environ.get("GHOSTVIS_KERNELS") or None
if _force is not None and _force not in _MODES:
    raise ValueError(f"GHOSTVIS_KERNELS={_force!r} is not supported; allowed: {list(_MODES)} or unset")

# What `apply_kernels` last turned on, per swap: e.g. {"rms_norm": "liger", "fused_ce": "liger", ...}.
ACTIVE: dict[str, str] = {}


def force(mode: str | None) -> None:
    """Forces every swap onto one path: `"fallback"` (plain PyTorch), `"fast"` (raise if missing) or `None` (auto)."""
    global _force
    if mode is not None and mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not supported; allowed: {list(_MODES)} or None")
    _force = mode


def forced_mode() -> str | None:
    return _force


@contextlib.contextmanager
def forced(mode: str | None):
    """Context manager form of `force` (restores the previous mode)."""
    previous = _force
    force(mode)
    try:
        yield
    finally:
        force(previous)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def liger_available() -> bool:
    """Liger needs triton and a CUDA device; checked without importing either."""
    return torch.cuda.is_available() and _has_module("triton") and _has_module("liger_kernel")


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and _has_module("flash_attn")


def varlen_attn_fn():
    """`torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10, CUDA) or `None`."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_call_kwargs(fn, causal: bool, gqa: bool) -> dict | None:
    """Keyword arguments for causal/GQA across `varlen_attn` versions (`is_causal=` in 2.10/2.11, `window_size=(-1, 0)`
    later); `None` for GQA when that version cannot do it natively (the caller repeats K/V)."""
    params = inspect.signature(fn).parameters
    kwargs = {}
    if causal:
        if "is_causal" in params:
            kwargs["is_causal"] = True
        elif "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            raise RuntimeError("this varlen_attn has neither is_causal nor window_size")
    if gqa:
        if "enable_gqa" not in params:
            return None
        kwargs["enable_gqa"] = True
    return kwargs


def want_fast(available: bool, what: str) -> bool:
    """Resolves the switch for one swap: whether to use its fast kernel."""
    if _force == "fallback":
        return False
    if not available and _force == "fast":
        raise RuntimeError(f"GHOSTVIS_KERNELS=fast but the fast kernel for {what} is not available here")
    return available
