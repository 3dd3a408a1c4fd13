"""GhostVis's quantization choices: which modules stay unquantized, the int8 weight-only format the engine reads, and
the one bitsandbytes start-up message that is noise here.

- `--quantize int8` is weight-only int8 in torchao's format (`TorchAoConfig(Int8WeightOnlyConfig())`): per output
  channel symmetric int8 weights with float32 scales, for the text decoder's q/k/v/o/gate/up/down projections. It
  round-trips through `save_pretrained` / `from_pretrained(trust_remote_code=True)` (safetensors; the loading side
  needs `torchao` installed, nothing of GhostVis), and the engine's fused decode kernels read its int8 data and
  scales directly (`int8_weight_only`). NOTE: so GhostVis needs no quantizer of its own and no extra file travelling
  with checkpoints. With transformers 5.24 a checkpoint *loaded* int8 cannot be saved again (its torchao
  deserialisation has no reverse op: `NotImplementedError` in `revert_weight_conversion`); quantize from the
  unquantized checkpoint and save that.
- `--quantize bnb-int8|bnb-nf4` are bitsandbytes' (CUDA only; nf4 for QLoRA-size memory, both decode eagerly).

The vision tower, resampler, projector and `lm_head` stay unquantized: they are a small share of the bytes (the
decoder's linear layers are ~90% of a 1.5B model) and quantizing them costs the most accuracy (image features, output
distribution). Training (`ghostvis_hf.training`) and loading for inference (`ghostvis_hf.inference.loader`) both read
this one list. NOTE: the names carry the `model.` prefix because transformers >= 5.x matches a skip pattern from the
start of a parameter's full name (or as its suffix): a bare `"vision_tower"` matched nothing, and every `Linear` of
the vision tower, resampler and projector was quantized (measured with transformers 5.24, torchao and bitsandbytes
alike).

NOTE: peft imports bitsandbytes whenever it is installed (so every TRL recipe start does), and bitsandbytes >= 0.49 on
a CPU with AVX512-BF16 then warns "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
'kernels'": it looks for an optional faster CPU kernel for 4-bit matmuls, which only QLoRA *on the CPU* would use and
which falls back to its own. `quiet_bitsandbytes_cpu_kernel_warning` drops that one record (only when the optional
`kernels` package is missing; any other failure still shows); importing `ghostvis_hf` installs it, so a script that
imports `ghostvis_hf` before `trl`/`peft` never prints it. Remove when bitsandbytes stops warning at import.
Likewise torchao 0.18, which transformers imports with its quantizers (so every GhostVis process where torchao is
installed): on a CPU-only torch build it warns "Failed to load .../torchao/_C_mxfp8...so" (its CUDA kernels, which
`--quantize int8` never uses on the CPU), and on torch >= 2.13 its `register_constant` calls for two Enums make
torch warn "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile ...". Both
are dropped the same way; remove when torchao stops registering Enums and ships loadable extensions.
"""

import logging

import torch

# A tuple so that no caller can change it for the others; the quantization configs get `list(QUANT_SKIP_MODULES)`.
QUANT_SKIP_MODULES = ("model.vision_tower", "model.resampler", "model.multi_modal_projector", "lm_head")

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
TORCHAO_LOGGER, PYTREE_LOGGER = "torchao", "torch.utils._pytree"


class _TorchaoImportFilter(logging.Filter):
    """Drops torchao's import-time noise: its CUDA extensions failing on a CPU-only torch, its Enum registrations."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == PYTREE_LOGGER:
            return "is an Enum subclass and is now natively supported by torch.compile" not in message
        return not (torch.version.cuda is None and message.startswith("Failed to load ") and "torchao/_C" in message)


class _MissingKernelsPackageFilter(logging.Filter):
    """Drops bitsandbytes' import-time warning about the optional `kernels` package; says why once, at DEBUG."""

    explained = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if not (str(record.msg).startswith(_BNB_KERNEL_MESSAGE) and isinstance(exc, ModuleNotFoundError)
                and exc.name == "kernels"):
            return True
        if not self.explained:
            type(self).explained = True
            logging.getLogger("ghostvis").debug(
                "bitsandbytes: no `kernels` package, so CPU 4-bit matmuls use bitsandbytes' own kernel "
                "(only QLoRA on the CPU would use it; `pip install kernels` to get the faster one)")
        return False


def quiet_bitsandbytes_cpu_kernel_warning() -> None:
    """Installs the filters on bitsandbytes' CPU-backend logger and torchao's (idempotent); it must run before they
    are imported, since the warnings are logged at import."""
    for name, kind in ((BNB_CPU_LOGGER, _MissingKernelsPackageFilter), (TORCHAO_LOGGER, _TorchaoImportFilter),
                       (PYTREE_LOGGER, _TorchaoImportFilter)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


quiet_bitsandbytes_cpu_kernel_warning()


def quantization_kind(model) -> str | None:
    """`"int8"` for torchao int8 weight-only, `"bnb"` for bitsandbytes, the `quant_method` of any other
    quantization, `None` for an unquantized model."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(model.config, "quantization_config", None)
    if config is None:
        return "unknown" if getattr(model, "is_quantized", False) else None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    if method == "torchao":
        quant_type = config.get("quant_type") if isinstance(config, dict) else getattr(config, "quant_type", None)
        name = quant_type.get("default", {}).get("_type") if isinstance(quant_type, dict) else type(quant_type).__name__
        return "int8" if name == "Int8WeightOnlyConfig" else f"torchao {name}"
    return "bnb" if method == "bitsandbytes" else str(method)


def int8_weight_only(weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(qdata, scale)` of a weight in the int8 weight-only format (torchao's `Int8Tensor`, one symmetric scale per
    output row): int8 `[N, K]` and float `[N]`, the tensors the weight itself holds (no copy). `None` for any other
    weight: a plain float tensor, bitsandbytes, or another torchao layout (per group, zero points, int8 activations).
    """
    qdata = getattr(weight, "qdata", None)
    if not isinstance(qdata, torch.Tensor) or qdata.dtype != torch.int8 or qdata.dim() != 2:
        return None
    zero_point = getattr(weight, "zero_point", None)
    if (list(getattr(weight, "block_size", ())) != [1, qdata.shape[1]]
            or getattr(weight, "act_quant_kwargs", None) is not None
            or getattr(weight, "act_pre_scale", None) is not None
            or (zero_point is not None and bool(zero_point.any()))):
        return None
    return qdata, weight.scale.reshape(-1)


def tensor_bytes(tensor) -> int:
    """Bytes a parameter really occupies: int8 data + scales for the int8 format (`numel() * element_size()` would
    count it at the model dtype), else `numel() * element_size()`."""
    int8 = int8_weight_only(tensor)
    if int8 is not None:
        qdata, scale = int8
        return qdata.numel() + scale.numel() * scale.element_size()
    return tensor.numel() * tensor.element_size()
