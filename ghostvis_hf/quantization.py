"""Which GhostVis modules stay unquantized under bitsandbytes int8/nf4, for QLoRA training and quantized serving; and
the one bitsandbytes start-up message that is noise here.

The vision tower, resampler, projector and `lm_head` stay in bf16: they are a small share of the bytes (the decoder's
linear layers are ~90% of a 1.5B model) and quantizing them costs the most accuracy (image features, output
distribution). Training (`ghostvis_hf.training`) and loading for inference (`ghostvis_hf.inference.loader`) both read
this one list.

NOTE: peft imports bitsandbytes whenever it is installed (so every TRL recipe start does), and bitsandbytes >= 0.49 on
a CPU with AVX512-BF16 then warns "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
'kernels'": it looks for an optional faster CPU kernel for 4-bit matmuls, which only QLoRA *on the CPU* would use and
which falls back to its own. `quiet_bitsandbytes_cpu_kernel_warning` drops that one record (only when the optional
`kernels` package is missing; any other failure still shows); importing `ghostvis_hf` installs it, so a script that
imports `ghostvis_hf` before `trl`/`peft` never prints it. Remove when bitsandbytes stops warning at import.
"""

import logging

# A tuple so that no caller can change it for the others; `BitsAndBytesConfig` gets `list(QUANT_SKIP_MODULES)`.
QUANT_SKIP_MODULES = ("vision_tower", "resampler", "multi_modal_projector", "lm_head")

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


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
    """Installs the filter on bitsandbytes' CPU-backend logger (idempotent); it must run before bitsandbytes is
    imported, since the warning is logged at import."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _MissingKernelsPackageFilter) for f in logger.filters):
        logger.addFilter(_MissingKernelsPackageFilter())


quiet_bitsandbytes_cpu_kernel_warning()
