"""Helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import math
import time

import torch


def copy_bandwidth(nbytes: int = 1 << 29) -> float:
    """Bytes per second of a large float64 tensor copy (read + write), best of five."""
    a = torch.ones(nbytes // 8, dtype=torch.float64)
    b = torch.empty_like(a)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best
