"""Optional Triton import shared by the kernel modules (the package works without Triton)."""

from __future__ import annotations

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # the torch references are used instead
    triton = None
    tl = None
    AVAILABLE = False


def jit(fn):
    """``triton.jit`` when Triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if AVAILABLE else fn


@jit
def offset64(index, stride):
    """``index * stride`` in 64 bits (an int32 product wraps once it passes 2^31)."""
    return tl.cast(index, tl.int64) * tl.cast(stride, tl.int64)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def acc_is_f64(*tensors) -> bool:
    """Accumulate in float64 when any input is float64, else float32 (bfloat16/half inputs too)."""
    import torch

    return any(t.dtype == torch.float64 for t in tensors)
