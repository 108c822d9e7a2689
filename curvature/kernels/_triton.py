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


_TILE_TABLES: dict = {}


def tile_table(counts, device):
    """``[T, 2]`` int32 pairs (segment, tile) for segments with ``counts`` tiles each: a grid of
    exactly ``T = sum(counts)`` programs, none idle (a ``(segments, max count)`` grid leaves most
    of its programs without work when one segment is much larger than the others). Cached."""
    import torch

    key = (tuple(int(c) for c in counts), str(device))
    table = _TILE_TABLES.get(key)
    if table is None:
        pairs = [(i, j) for i, c in enumerate(key[0]) for j in range(c)]
        table = torch.tensor(pairs or [(0, 0)], dtype=torch.int32).to(device)
        if len(_TILE_TABLES) > 256:
            _TILE_TABLES.clear()
        _TILE_TABLES[key] = table
    return table


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
