"""Gradient compression on the wire: what `parallel.compression` names, in one place.

    "none"  gradients travel in their own dtype (fp32 master gradients: 4 bytes each)
    "fp16"  cast to float16 before the collective and back after: half the bytes. A sum of R fp16
            values can overflow where each alone does not, so each rank divides by R *before* the
            sum (the pre-divide) and every rank checks the result for inf/NaN together
            (precision.LossScaler's world-agreed check): an overflowing step is skipped.
    "bf16"  cast to bfloat16: half the bytes with float32's exponent range, so no overflow, no
            pre-divide and no overflow check; 8 significant bits instead of fp16's 11. Needs the
            project's Horovod patch (patches/horovod/0003-bfloat16.patch): no Horovod release
            reduces bfloat16 tensors. Each hop of the reduction rounds its partial sum once to
            bfloat16 (MPI, Gloo and NCCL alike compute each hop's sum in float32).

The compressors follow Horovod's interface (`compress(t) -> (t', ctx)`, `decompress(t', ctx)`), so
DistributedOptimizer takes them as they are; ZeRO's reduce-scatter uses `wire_dtype`.
"""

from __future__ import annotations

import horovod.torch as hvd
import torch
from horovod.torch.compression import Compressor


class BF16Compressor(Compressor):
    """Floating tensors travel as bfloat16 and come back in their own dtype."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
        if tensor.is_floating_point() and tensor.dtype != torch.bfloat16:
            return tensor.to(torch.bfloat16), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: torch.dtype | None) -> torch.Tensor:
        return tensor if ctx is None else tensor.to(ctx)


COMPRESSORS: dict[str, type] = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
                                "bf16": BF16Compressor}


def compressor(name: str) -> type:
    """The Horovod compressor for a `parallel.compression` value."""
    return COMPRESSORS[name]


def wire_dtype(name: str, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a floating gradient of `dtype` has on the wire under compression `name`."""
    return {"none": dtype, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def wire_bytes(name: str) -> int:
    """Bytes per fp32 gradient element on the wire (4, or 2 compressed)."""
    return wire_dtype(name).itemsize


def predivide_factor(name: str, replicas: int) -> float:
    """fp16 sums are divided by the replicas before the all-reduce so they cannot overflow;
    bf16 has float32's range and needs no pre-divide."""
    return float(replicas) if name == "fp16" and replicas > 1 else 1.0


def needs_overflow_check(name: str) -> bool:
    """Whether a compressed sum can overflow (then every rank checks for inf/NaN together)."""
    return name == "fp16"
