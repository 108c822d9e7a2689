r"""Batched rank-1 Sherman-Morrison updates of many MKOR factor inverses of different sizes.

For each factor ``i`` with inverse ``A_i = L_i^{-1}`` (size ``n_i``), vector ``u_i`` and decay
``gamma``, the moving average ``L_i <- gamma L_i + (1 - gamma) u_i u_i^T`` is inverted by

.. math::  B = A / \gamma, \qquad A \leftarrow B - \frac{(1-\gamma) (B u)(B u)^\top}{1 + (1-\gamma) u^\top B u}.

The Triton path updates all factors in two launches whatever their number and sizes: the first
computes every ``A_i u_i`` (a program per factor and row tile), the second rewrites every factor
(a program per factor and tile of the matrix), addressing the factors through a table of their
pointers. The torch reference loops over the factors. Both compute in the factors' dtype
(float64 for MKOR) and leave the symmetrisation to the caller.
"""

from __future__ import annotations

import torch

from ._triton import AVAILABLE, jit, tl


def reference(inverses: list[torch.Tensor], vectors: list[torch.Tensor], decay: float) -> None:
    """In place: every ``inverses[i]`` becomes the inverse after folding in ``vectors[i]``."""
    w = 1.0 - decay
    for a, u in zip(inverses, vectors):
        u = u.to(a.dtype)
        au = (a @ u) / decay
        a.div_(decay).sub_(torch.outer(au, au) * (w / (1.0 + w * (u @ au))))


@jit
def _matvec_kernel(addr_ptr, vec_ptr, voff_ptr, size_ptr, out_ptr, TILE: tl.constexpr):
    f = tl.program_id(0)
    rt = tl.program_id(1)
    n = tl.load(size_ptr + f)
    if rt * TILE < n:
        a_ptr = tl.load(addr_ptr + f).to(tl.pointer_type(tl.float64))
        voff = tl.load(voff_ptr + f)
        rows = rt * TILE + tl.arange(0, TILE)
        mr = rows < n
        acc = tl.zeros((TILE,), dtype=tl.float64)
        for c0 in range(0, n, TILE):
            cols = c0 + tl.arange(0, TILE)
            mc = cols < n
            a = tl.load(
                a_ptr + rows[:, None].to(tl.int64) * n + cols[None, :],
                mask=mr[:, None] & mc[None, :],
                other=0.0,
            )
            u = tl.load(vec_ptr + voff + cols, mask=mc, other=0.0)
            acc += tl.sum(a * u[None, :], axis=1)
        tl.store(out_ptr + voff + rows, acc, mask=mr)


@jit
def _rank1_kernel(addr_ptr, vec_ptr, au_ptr, voff_ptr, size_ptr, decay_ptr, TILE: tl.constexpr):
    f = tl.program_id(0)
    t = tl.program_id(1)
    n = tl.load(size_ptr + f)
    tiles = (n + TILE - 1) // TILE
    rt = t // tiles
    ct = t % tiles
    if rt < tiles:
        a_ptr = tl.load(addr_ptr + f).to(tl.pointer_type(tl.float64))
        voff = tl.load(voff_ptr + f)
        decay = tl.load(decay_ptr)  # float64 (a Python float argument would arrive as float32)
        # u^T A u over the whole factor (n values, cheap next to the tile)
        dot = tl.zeros((TILE,), dtype=tl.float64)
        for c0 in range(0, n, TILE):
            cols = c0 + tl.arange(0, TILE)
            mc = cols < n
            dot += tl.load(vec_ptr + voff + cols, mask=mc, other=0.0) * tl.load(
                au_ptr + voff + cols, mask=mc, other=0.0
            )
        w = 1.0 - decay
        utau = tl.sum(dot, axis=0) / decay
        coef = w / (1.0 + w * utau) / (decay * decay)
        rows = rt * TILE + tl.arange(0, TILE)
        cols = ct * TILE + tl.arange(0, TILE)
        mr = rows < n
        mc = cols < n
        ar = tl.load(au_ptr + voff + rows, mask=mr, other=0.0)
        ac = tl.load(au_ptr + voff + cols, mask=mc, other=0.0)
        ptrs = a_ptr + rows[:, None].to(tl.int64) * n + cols[None, :]
        m2 = mr[:, None] & mc[None, :]
        a = tl.load(ptrs, mask=m2, other=0.0)
        a = a / decay - coef * ar[:, None] * ac[None, :]
        tl.store(ptrs, a, mask=m2)


def launch(
    inverses: list[torch.Tensor], vectors: list[torch.Tensor], decay: float, tile: int = 32
) -> None:
    """Triton: all factors in two launches (float64 factors)."""
    if not inverses:
        return
    dev = inverses[0].device
    sizes = [a.shape[0] for a in inverses]
    offs = [0]
    for s in sizes[:-1]:
        offs.append(offs[-1] + s)
    vec = torch.cat([u.to(device=dev, dtype=torch.float64).reshape(-1) for u in vectors])
    au = torch.empty_like(vec)
    addr = torch.tensor([a.data_ptr() for a in inverses], dtype=torch.int64, device=dev)
    voff = torch.tensor(offs, dtype=torch.int64, device=dev)
    size = torch.tensor(sizes, dtype=torch.int32, device=dev)
    row_tiles = max(-(-s // tile) for s in sizes)
    _matvec_kernel[(len(inverses), row_tiles)](addr, vec, voff, size, au, TILE=tile)
    _rank1_kernel[(len(inverses), row_tiles * row_tiles)](
        addr, vec, au, voff, size, torch.tensor([decay], dtype=torch.float64, device=dev), TILE=tile
    )


def supported(inverses: list[torch.Tensor]) -> bool:
    return AVAILABLE and all(a.dtype == torch.float64 and a.is_contiguous() for a in inverses)
