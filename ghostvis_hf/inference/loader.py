"""`load_model`: one place that turns a checkpoint path into (model, processor) for chat, serve and benchmarks.

`--quantize int8` is int8 weight-only through torchao's `TorchAoConfig(Int8WeightOnlyConfig())` (CPU and CUDA; the
engine's fused decode kernels read it); `bnb-int8` / `bnb-nf4` go through bitsandbytes' `BitsAndBytesConfig` (CUDA
only). Either way the modules in `ghostvis_hf.quantization.QUANT_SKIP_MODULES` (vision tower, resampler, projector,
`lm_head`) stay unquantized. A checkpoint saved int8 loads int8 without `quantize` (its config says so).
"""

import os

import torch

from ..arg_types import written_as_path
from ..quantization import QUANT_SKIP_MODULES, tensor_bytes

QUANTIZE_CHOICES = ("int8", "bnb-int8", "bnb-nf4")
QUANTIZE_HELP = ("int8: weight-only int8 (torchao; CPU or CUDA, the engine's fast decode path); bnb-int8 / bnb-nf4: "
                 "bitsandbytes (CUDA only, eager decoding: memory, not speed)")
_RENAMED = {"nf4": "bnb-nf4"}  # before issue 18; `int8` meant bitsandbytes' LLM.int8() then
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def resolve_device(device=None) -> torch.device:
    """`device`, or CUDA when available, else the CPU."""
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantization_config(quantize: str, device: torch.device):
    """A `TorchAoConfig` for `int8`, a `BitsAndBytesConfig` for `bnb-int8` / `bnb-nf4`; raises a clear error for an
    unknown choice, without the library, or (bitsandbytes) off CUDA."""
    if quantize not in QUANTIZE_CHOICES:
        hint = f" (renamed to {_RENAMED[quantize]!r})" if quantize in _RENAMED else ""
        raise ValueError(f"quantize={quantize!r} is not supported{hint}; allowed: {list(QUANTIZE_CHOICES)}")
    if quantize == "int8":
        try:
            from torchao.quantization import Int8WeightOnlyConfig
        except ImportError:
            raise RuntimeError("--quantize int8 needs torchao: pip install 'ghostvis-hf[int8]'") from None
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=list(QUANT_SKIP_MODULES))
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"--quantize {quantize} needs a CUDA GPU: bitsandbytes' int8/nf4 kernels do not run on {device.type}. "
            "Use --quantize int8 (torchao weight-only, runs anywhere) or drop --quantize on this machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError(f"--quantize {quantize} needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from None
    from transformers import BitsAndBytesConfig

    if quantize == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(QUANT_SKIP_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(QUANT_SKIP_MODULES),
    )


def check_checkpoint_path(path: str) -> None:
    """Raises `FileNotFoundError` when `path` is written as a local path (absolute, `./`, `../`, `~`, or with more
    than one `/`) and no such folder exists; otherwise the Hub's "Repo id must be in the form ..." is all one hears.
    `namespace/name` stays a Hub id unless it is a local folder."""
    if written_as_path(path) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"no checkpoint folder at {path!r}")


def load_model(path: str, quantize: str | None = None, dtype=None, device=None):
    """Loads a GhostVis checkpoint folder (or Hub id) and its processor, ready for `GenerationEngine`.

    Args:
        path (`str`): checkpoint folder or Hub repository id.
        quantize (`str`, *optional*): `"int8"` (weight-only, torchao's format: the fast decode path, CPU or CUDA),
            `"bnb-int8"` or `"bnb-nf4"` (bitsandbytes, CUDA only); vision tower, resampler, projector and `lm_head`
            stay unquantized.
        dtype (`torch.dtype` or `str`, *optional*): defaults to bfloat16 on CUDA and float32 on the CPU.
        device (`str` or `torch.device`, *optional*): defaults to CUDA when available.

    Returns:
        `(model, processor)`, the model in eval mode.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import ghostvis_hf  # noqa: F401  (registers the GhostVis classes with the Auto classes)

    check_checkpoint_path(path)
    device = resolve_device(device)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kwargs = dict(dtype=dtype, trust_remote_code=True)
    if quantize:
        kwargs["quantization_config"] = quantization_config(quantize, device)
        if device.type == "cuda":  # quantize on the GPU while loading
            kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return model.eval(), processor


def footprint_bytes(model) -> int:
    """Bytes of parameters and buffers, int8 weights at their real size (`get_memory_footprint` counts torchao's
    int8 tensors at the model dtype)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(tensor_bytes(t) for t in tensors.values())


def memory_footprint(model) -> str:
    """Parameters and buffers as a human-readable size (what quantization shrinks), e.g. `"3.55 GB"`."""
    size = footprint_bytes(model)
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
