r"""Batched rank-1 Sherman-Morrison updates of many MKOR factor inverses of different sizes.

For each factor ``i`` with inverse ``A_i`` (size ``n_i``) and vector ``u_i``, one update is

.. math::  P = \alpha A + \beta I, \qquad A \leftarrow P - \frac{c\, (P u)(P u)^\top}{1 + c\, u^\top P u}.

With ``(alpha, beta, c) = (1/gamma, 0, 1 - gamma)`` this inverts the moving average of the factor,
``L <- gamma L + (1 - gamma) u u^T`` (``A = L^{-1}``); with ``(gamma, 1 - gamma, 1)`` it is the
MKOR authors' update, a moving average of the inverse toward ``I`` followed by a rank-1 term of
weight 1 (:func:`coefficients`).

The Triton path updates all factors in two launches whatever their number and sizes: the first
computes every ``A_i u_i`` (a program per factor and row tile), the second rewrites every factor
(a program per factor and tile of the matrix), addressing the factors through a table of their
pointers. The torch reference loops over the factors. Both compute in the factors' dtype
(float64 for MKOR) and leave the symmetrisation to the caller.
"""

from __future__ import annotations

import torch

from ._triton import AVAILABLE, jit, tile_table, tl

FORMS = ("factor", "inverse")


def coefficients(decay: float, form: str = "factor") -> tuple[float, float, float]:
    """``(alpha, beta, c)`` of the update for ``form``: ``"factor"`` (the moving average of the
    factor, inverted exactly) or ``"inverse"`` (the MKOR code's blend of the inverse toward I)."""
    if form == "factor":
        return 1.0 / decay, 0.0, 1.0 - decay
    if form == "inverse":
        return decay, 1.0 - decay, 1.0
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def reference(
    inverses: list[torch.Tensor], vectors: list[torch.Tensor], decay: float, form: str = "factor"
) -> None:
    """In place: every ``inverses[i]`` becomes the inverse after folding in ``vectors[i]``."""
    alpha, beta, c = coefficients(decay, form)
    for a, u in zip(inverses, vectors):
        u = u.to(a.dtype)
        pu = alpha * (a @ u) + beta * u
        a.mul_(alpha)
        a.diagonal().add_(beta)
        a.sub_(torch.outer(pu, pu) * (c / (1.0 + c * (u @ pu))))


TILE = 32  # the tile the launcher uses (tests pass smaller ones to split tiny factors)


@jit
def _matvec_kernel(tile_tab, addr_ptr, vec_ptr, voff_ptr, size_ptr, out_ptr, TILE: tl.constexpr):
    f = tl.load(tile_tab + tl.program_id(0) * 2)  # (factor, row tile) from the tile table
    rt = tl.load(tile_tab + tl.program_id(0) * 2 + 1)
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
def _rank1_kernel(
    tile_tab, addr_ptr, vec_ptr, au_ptr, voff_ptr, size_ptr, coef_ptr, TILE: tl.constexpr
):
    f = tl.load(tile_tab + tl.program_id(0) * 2)  # (factor, tile of the matrix)
    t = tl.load(tile_tab + tl.program_id(0) * 2 + 1)
    n = tl.load(size_ptr + f)
    tiles = (n + TILE - 1) // TILE
    rt = t // tiles
    ct = t % tiles
    if rt < tiles:
        a_ptr = tl.load(addr_ptr + f).to(tl.pointer_type(tl.float64))
        voff = tl.load(voff_ptr + f)
        # alpha, beta, c as float64 (a Python float argument would arrive as float32)
        alpha = tl.load(coef_ptr)
        beta = tl.load(coef_ptr + 1)
        c = tl.load(coef_ptr + 2)
        # u^T A u and u^T u over the whole factor (n values, cheap next to the tile)
        dot = tl.zeros((TILE,), dtype=tl.float64)
        uu = tl.zeros((TILE,), dtype=tl.float64)
        for c0 in range(0, n, TILE):
            cols = c0 + tl.arange(0, TILE)
            mc = cols < n
            uv = tl.load(vec_ptr + voff + cols, mask=mc, other=0.0)
            dot += uv * tl.load(au_ptr + voff + cols, mask=mc, other=0.0)
            uu += uv * uv
        upu = alpha * tl.sum(dot, axis=0) + beta * tl.sum(uu, axis=0)  # u^T P u
        coef = c / (1.0 + c * upu)
        rows = rt * TILE + tl.arange(0, TILE)
        cols = ct * TILE + tl.arange(0, TILE)
        mr = rows < n
        mc = cols < n
        pr = alpha * tl.load(au_ptr + voff + rows, mask=mr, other=0.0) + beta * tl.load(
            vec_ptr + voff + rows, mask=mr, other=0.0
        )
        pc = alpha * tl.load(au_ptr + voff + cols, mask=mc, other=0.0) + beta * tl.load(
            vec_ptr + voff + cols, mask=mc, other=0.0
        )
        ptrs = a_ptr + rows[:, None].to(tl.int64) * n + cols[None, :]
        m2 = mr[:, None] & mc[None, :]
        a = tl.load(ptrs, mask=m2, other=0.0)
        eye = (rows[:, None] == cols[None, :]).to(tl.float64)
        a = alpha * a + beta * eye - coef * pr[:, None] * pc[None, :]
        tl.store(ptrs, a, mask=m2)


def launch(
    inverses: list[torch.Tensor],
    vectors: list[torch.Tensor],
    decay: float,
    form: str = "factor",
    tile: int | None = None,
) -> None:
    """Triton: all factors in two launches (float64 factors)."""
    if not inverses:
        return
    tile = tile or TILE
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
    row_tiles = [-(-s // tile) for s in sizes]
    tab = tile_table(row_tiles, dev)
    _matvec_kernel[(sum(row_tiles),)](tab, addr, vec, voff, size, au, TILE=tile)
    coef = torch.tensor(coefficients(decay, form), dtype=torch.float64, device=dev)
    tab2 = tile_table([t * t for t in row_tiles], dev)
    _rank1_kernel[(sum(t * t for t in row_tiles),)](
        tab2, addr, vec, au, voff, size, coef, TILE=tile
    )


def supported(inverses: list[torch.Tensor]) -> bool:
    return AVAILABLE and all(a.dtype == torch.float64 and a.is_contiguous() for a in inverses)
