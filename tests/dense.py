"""Dense float64 ground truth shared by the tests.

The Fisher inverse reference is built from an SVD of each block's gradients rather than by
inverting ``F``: ``F^-1 = I/damp - V diag(s^2 / (damp (damp + s^2))) V^T`` keeps full relative
accuracy in the null space even when ``F`` has a condition number of ``1e12`` (tiny damping,
large gradients), where a plain ``inv(F)`` would itself be off by ``1e-4``.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def block_slices(d: int, block_size: int | None) -> list[slice]:
    b = d if block_size is None else min(block_size, d)
    return [slice(s, min(d, s + b)) for s in range(0, d, b)]


def fisher_inverse(grads: torch.Tensor, damp: float, num_grads: int, block_size=None):
    """Dense ``[d, d]`` inverse of the damped block-diagonal empirical Fisher (float64)."""
    grads = grads.to(F64)
    d = grads.shape[1]
    out = torch.zeros(d, d, dtype=F64)
    for sl in block_slices(d, block_size):
        g = grads[:, sl] / math.sqrt(num_grads)
        n = g.shape[1]
        eye = torch.eye(n, dtype=F64) / damp
        if g.shape[0] == 0:
            out[sl, sl] = eye
            continue
        _, s, vh = torch.linalg.svd(g, full_matrices=False)
        shrink = s**2 / (damp * (damp + s**2))
        out[sl, sl] = eye - vh.T @ torch.diag(shrink) @ vh
    return out


def fisher(grads: torch.Tensor, damp: float, num_grads: int, block_size=None) -> torch.Tensor:
    grads = grads.to(F64)
    d = grads.shape[1]
    out = torch.eye(d, dtype=F64) * damp
    for sl in block_slices(d, block_size):
        out[sl, sl] += grads[:, sl].T @ grads[:, sl] / num_grads
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(F64), b.to(F64)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_grads(m: int, d: int, *, scale: float = 1.0, rank: int | None = None, seed: int = 0):
    """``m`` gradients of norm about ``scale``; ``rank`` makes them nearly low-rank."""
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        g = torch.randn(m, d, generator=gen, dtype=F64)
    else:
        g = torch.randn(m, rank, generator=gen, dtype=F64) @ torch.randn(
            rank, d, generator=gen, dtype=F64
        )
        g += 1e-6 * torch.randn(m, d, generator=gen, dtype=F64)  # nearly, not exactly, low rank
    return g * (scale / g.norm(dim=1, keepdim=True))


def cancellation_factor(grads: torch.Tensor, damp: float, num_grads: int, block_size=None) -> float:
    """``1 + s_max^2 / damp``: how far ``F^-1`` cancels from its start ``I / damp``.

    Both stored forms of the inverse lose about ``log10`` of this many digits.
    """
    d = grads.shape[1]
    s_max = max(
        torch.linalg.svdvals(grads[:, sl].to(F64) / math.sqrt(num_grads))[0].item()
        for sl in block_slices(d, block_size)
    )
    return 1.0 + s_max**2 / damp
