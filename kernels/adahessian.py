r"""Fused AdaHessian parameter update.

For one parameter ``p`` with gradient ``g``, a fresh Hutchinson estimate ``d = z * Hz`` (or none
when the Hessian is not refreshed this step), first moment ``m`` and Hessian RMS average ``v``:

.. math::
    m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad
    v \leftarrow \beta_2 v + (1-\beta_2) \bar d^{\,2}, \qquad
    p \leftarrow p - \mathrm{lr}\Big(\frac{m / (1-\beta_1^t)}{(\sqrt{v / (1-\beta_2^{t_h})})^{k} + \epsilon}
        + \mathrm{wd}\; p\Big)

where ``\bar d`` is ``d`` averaged over its spatial segment: the kernel dims of a 4-D convolution
weight, the last dim of a 3-D weight, and runs of ``block_length`` along the last dim of 1-D and
2-D weights (the last run of a row may be shorter). ``t_h`` counts the Hessian refreshes.

The Triton kernel does all of it in one pass per parameter (each program owns whole segments, so
the average needs no second pass); the torch reference does the same math with tensor ops.
"""

from __future__ import annotations

import math

import torch
from curvature.kernels._triton import AVAILABLE, jit, next_pow2, tl


def segments(shape: torch.Size, block_length: int) -> tuple[int, int]:
    """``(row length, segment length)`` of the spatial averaging for a parameter shape."""
    if len(shape) == 4:
        return shape[2] * shape[3], shape[2] * shape[3]
    if len(shape) == 3:
        return shape[2], shape[2]
    if len(shape) in (1, 2) and block_length > 1:
        return shape[-1], block_length
    last = shape[-1] if len(shape) else 1
    return last, 1


def spatial_average(d: torch.Tensor, block_length: int) -> torch.Tensor:
    """Average ``d`` over its segments (see the module docstring); same shape as ``d``."""
    row, seg = segments(d.shape, block_length)
    if seg == 1:
        return d
    rows = d.reshape(-1, row)
    full = row - row % seg
    out = torch.empty_like(rows)
    if full:
        head = rows[:, :full].reshape(rows.shape[0], full // seg, seg)
        out[:, :full] = head.mean(-1, keepdim=True).expand_as(head).reshape(rows.shape[0], full)
    if full < row:
        out[:, full:] = rows[:, full:].mean(-1, keepdim=True)
    return out.view_as(d)


def reference(
    p,
    g,
    d,
    m,
    v,
    *,
    step,
    hessian_step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    hessian_power,
    block_length,
) -> None:
    """In place on ``p``, ``m``, ``v``; ``d`` is the raw estimate or ``None`` (no refresh)."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    if d is not None:
        da = spatial_average(d, block_length)
        v.mul_(beta2).addcmul_(da, da, value=1 - beta2)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2 ** max(hessian_step, 1)
    denom = (v / bc2).sqrt().pow(hessian_power).add_(eps)
    update = (m / bc1) / denom
    if weight_decay:
        update = update + weight_decay * p
    p.add_(update, alpha=-lr)


@jit
def _adahessian_kernel(
    p_ptr,
    g_ptr,
    d_ptr,
    m_ptr,
    v_ptr,
    nseg_total,
    row,
    seg,
    segs_per_row,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    hessian_power,
    bc1,
    bc2,
    HAS_D: tl.constexpr,
    TILE: tl.constexpr,
    SP: tl.constexpr,
):
    sid = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)  # segment ids [TILE]
    t = tl.arange(0, SP)
    r = sid // segs_per_row
    start = (sid % segs_per_row) * seg
    col = start[:, None] + t[None, :]
    msk = (sid[:, None] < nseg_total) & (t[None, :] < seg) & (col < row)
    off = r[:, None] * row + col
    g = tl.load(g_ptr + off, mask=msk, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + off, mask=msk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + off, mask=msk, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + off, mask=msk, other=0.0).to(tl.float32)
    m = beta1 * m + (1.0 - beta1) * g
    if HAS_D:
        d = tl.load(d_ptr + off, mask=msk, other=0.0).to(tl.float32)
        n = tl.sum(msk.to(tl.float32), axis=1)
        da = tl.sum(d, axis=1) / tl.maximum(n, 1.0)
        v = beta2 * v + (1.0 - beta2) * (da * da)[:, None]
    root = tl.sqrt(v / bc2)
    powed = tl.where(root > 0, tl.exp(hessian_power * tl.log(root)), 0.0)
    upd = (m / bc1) / (powed + eps) + weight_decay * p
    p = p - lr * upd
    tl.store(m_ptr + off, m.to(m_ptr.dtype.element_ty), mask=msk)
    tl.store(v_ptr + off, v.to(v_ptr.dtype.element_ty), mask=msk)
    tl.store(p_ptr + off, p.to(p_ptr.dtype.element_ty), mask=msk)


def launch(
    p,
    g,
    d,
    m,
    v,
    *,
    step,
    hessian_step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    hessian_power,
    block_length,
) -> None:
    """Triton: one pass over the parameter, a tile of whole averaging segments per program."""
    row, seg = segments(p.shape, block_length)
    numel = p.numel()
    if numel == 0:
        return
    segs_per_row = math.ceil(row / seg)
    nseg_total = (numel // row) * segs_per_row
    sp = next_pow2(seg)
    tile = max(1, 1024 // sp)
    g = g.contiguous()
    _adahessian_kernel[(math.ceil(nseg_total / tile),)](
        p,
        g,
        d.contiguous() if d is not None else g,
        m,
        v,
        nseg_total,
        row,
        seg,
        segs_per_row,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        float(hessian_power),
        1.0 - beta1**step,
        1.0 - beta2 ** max(hessian_step, 1),
        HAS_D=d is not None,
        TILE=tile,
        SP=sp,
    )


def supported(p, m, v) -> bool:
    return (
        AVAILABLE
        and p.dtype != torch.float64
        and all(t.is_contiguous() for t in (p, m, v))
        and segments(p.shape, 1)[1] <= 4096
    )
