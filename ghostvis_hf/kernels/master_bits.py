"""Compact fp32 master weights: an fp32 tensor as a bf16 tensor (its nearest bf16) and a 16-bit remainder.

The bit pattern of an fp32 number is its nearest bf16's pattern in the upper 16 bits plus a signed remainder in
[-32768, 32767] below, exactly, when "nearest" rounds ties away from zero (add 0x8000, keep the upper half). An
optimizer that keeps bf16 parameters (which the model computes with) and fp32 master weights (which it updates)
can therefore keep the masters as 2-byte remainders next to the parameters instead of 4-byte copies, and lose
nothing: `kernels.adamw`'s fused step reads and writes this layout (`MasterWeightOptimizer(compact=True)`).
Plain PyTorch, no Triton: state dicts and checkpoints convert with it.
"""

import torch


def split_master(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 tensor as (bf16, int16): the nearest bf16 (ties away from zero) and the signed remainder of the bit
    pattern below it, so that `join_master` gives the fp32 tensor back exactly. A compact master weight: 2 bytes next
    to the bf16 parameter instead of a 4-byte fp32 copy.

    Example:
    ```python
    >>> import torch
    >>> from ghostvis_hf.kernels.master_bits import join_master, split_master
    >>> x = torch.tensor([1.0 + 2**-20, -3.14159, 1e-30])
    >>> hi, lo = split_master(x)
    >>> hi.dtype, lo.dtype, torch.equal(join_master(hi, lo), x), torch.equal(hi, x.to(torch.bfloat16))
    (torch.bfloat16, torch.int16, True, True)

    ```
    """
    if master.dtype != torch.float32:
        raise ValueError(f"split_master takes float32, got {master.dtype}")
    bits = master.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    hi = (bits + 0x8000) >> 16
    lo = bits - (hi << 16)  # in [-32768, 32767]
    hi = torch.where(hi >= 32768, hi - 65536, hi)  # as a signed 16-bit pattern
    return hi.to(torch.int16).view(torch.bfloat16), lo.to(torch.int16)


def join_master(param: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp32 tensor whose `split_master` is `(param, low)`."""
    if param.dtype != torch.bfloat16 or low.dtype != torch.int16:
        raise ValueError(f"join_master takes (bfloat16, int16), got ({param.dtype}, {low.dtype})")
    bits = ((param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF) << 16) + low.to(torch.int64)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


__all__ = ["join_master", "split_master"]
