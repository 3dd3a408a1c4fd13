"""Quantization-aware training (`--qat int8`): fine-tune with the weights `--quantize int8` will store, then save a
plain float checkpoint.

The fake-quant is torchao's QAT (`QATConfig` + `IntxFakeQuantizeConfig(torch.int8, "per_channel",
is_symmetric=True)`, weights only): each forward uses the weight rounded to int8 with one symmetric scale per output
row, the same numbers `Int8WeightOnlyConfig` stores (the fake-quantized weight equals the int8 tensor's
`dequantize()` exactly, fp32 and bf16: tests/test_qat.py). Rounding passes the gradient straight through; only each
row's largest-magnitude weight, which also sets the scale, gets a different gradient (through the scale and torchao's
clamp at 127). It goes on exactly the modules `--quantize int8` quantizes: every `nn.Linear` outside
`QUANT_SKIP_MODULES` (the decoder's q/k/v/o/gate/up/down projections), never the vision tower, resampler, projector
or `lm_head`.

`FakeQuantizedLinear` is an `nn.Linear` with the same `weight`/`bias` parameters and no extra state, so the optimizer,
the Trainer's intermediate checkpoints and resuming see the plain model's state dict. At the end `convert_qat` swaps
the modules back (`QATConfig(step="convert")` without a base config: fake-quant removed, nothing quantized) and the
saved folder is a normal float checkpoint; `ghostvis eval --quantize int8` / `load_model(path, quantize="int8")`
quantize it.

Refused at start-up: LoRA/QLoRA (the fake-quant would see the frozen base weight, not the merged `W + BA` that
`--quantize int8` quantizes after `merge_and_unload`), and DeepSpeed/FSDP (parameters sharded or flattened outside the
module; not verified with torchao's QAT here).
"""

import logging

import torch

from ..quantization import QUANT_SKIP_MODULES
from .launch import sharded_by

logger = logging.getLogger("ghostvis")

QAT_CHOICES = ("int8",)


def normalize_qat(value: str | None) -> str | None:
    """`None` for no QAT (`None`, `"none"`, `""`), the scheme otherwise; raises `ValueError` for an unknown one.

    Example:
    ```python
    >>> from ghostvis_hf.training.qat import normalize_qat

    >>> normalize_qat("INT8"), normalize_qat("none")
    ('int8', None)

    ```
    """
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    scheme = str(value).strip().lower()
    if scheme not in QAT_CHOICES:
        raise ValueError(f"qat={value!r} is not supported; allowed: {', '.join(QAT_CHOICES)} or none")
    return scheme


def is_quantized_module(name: str, module: torch.nn.Module) -> bool:
    """Whether `--quantize int8` quantizes this module: an `nn.Linear` not under `QUANT_SKIP_MODULES` (matched from
    the start of its full name, as transformers matches `modules_to_not_convert`)."""
    skipped = any(name == prefix or name.startswith(prefix + ".") for prefix in QUANT_SKIP_MODULES)
    return isinstance(module, torch.nn.Linear) and not skipped


def check_qat_supported(model_args, training_args) -> None:
    """Raises `ValueError` for setups QAT cannot train correctly (see the module docstring)."""
    if getattr(model_args, "use_peft", False) or getattr(model_args, "load_in_4bit", False) \
            or getattr(model_args, "load_in_8bit", False):
        raise ValueError("--qat int8 trains the full decoder weights that --quantize int8 stores; it does not apply "
                         "to LoRA/QLoRA (the fake-quant would see the base weight, not the merged one): drop "
                         "--use_peft/--load_in_4bit/--load_in_8bit, or quantize the merged model post-training")
    sharded = sharded_by(training_args)
    if sharded:
        raise ValueError(f"--qat int8 is not supported with {sharded} (not verified "
                         "with torchao's QAT); use a single device or DDP (accelerate_configs/multi_gpu.yaml)")


def prepare_qat(model, scheme: str | None, model_args=None, training_args=None) -> dict | None:
    """Puts int8 weight fake-quant on the modules `--quantize int8` quantizes (in place).

    Args:
        model: a GhostVis model (float weights: fp32 or bf16).
        scheme (`str` or `None`): `"int8"`, or `None` for nothing.
        model_args (`trl.ModelConfig`, *optional*) / training_args (*optional*): checked by `check_qat_supported`.

    Returns:
        `dict` for the run summary (`scheme`, `modules`: how many were fake-quantized, `method`), or `None` without
        QAT.
    """
    scheme = normalize_qat(scheme)
    if scheme is None:
        return None
    check_qat_supported(model_args, training_args)
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except ImportError:
        raise RuntimeError("--qat int8 needs torchao: pip install 'ghostvis-hf[int8]'") from None
    names = [name for name, module in model.named_modules() if is_quantized_module(name, module)]
    if not names:
        raise ValueError("--qat int8: the model has no linear layer that --quantize int8 would quantize")
    weight_config = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    quantize_(model, QATConfig(weight_config=weight_config, step="prepare"),
              filter_fn=lambda module, name: is_quantized_module(name, module))
    logger.info("QAT %s: int8 weight fake-quant on %d linear layers (the decoder's projections)", scheme, len(names))
    return {"scheme": scheme, "modules": len(names),
            "method": "torchao QAT, int8 per-output-channel symmetric weights, no activation fake-quant"}


def convert_qat(model) -> int:
    """Removes the fake-quant (back to `nn.Linear`, same parameters); returns how many modules were converted."""
    from torchao.quantization.qat import FakeQuantizedLinear

    count = sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    if count:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        # only the swapped modules: a filter that matched the root would stop quantize_'s recursion there
        quantize_(model, QATConfig(step="convert"),
                  filter_fn=lambda module, name: isinstance(module, FakeQuantizedLinear))
    return count
