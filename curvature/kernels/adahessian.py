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

The Triton kernel updates all float32 parameters of a group in one launch (one per distinct
segment length), in one pass over each (a program owns whole segments, so the average needs no
second pass), addressing the tensors through tables of their pointers; the torch reference does
the same math with tensor ops, one parameter at a time.
"""

from __future__ import annotations

import math

import torch

from ._triton import AVAILABLE, jit, next_pow2, tile_table, tl

#: The longest averaging segment the kernel takes (longer ones use the torch path).
MAX_SEGMENT = 4096


def config(sp: int) -> dict:
    """Constexprs and warps for padded segment length ``sp`` (one place for launch and checks)."""
    # long segments get more warps, so a program's 4 arrays of SP values stay in registers
    return {"TILE": max(1, 1024 // sp), "SP": sp, "num_warps": max(4, min(16, sp // 256))}


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
    tile_tab,
    p_tab,
    g_tab,
    d_tab,
    m_tab,
    v_tab,
    meta_ptr,
    bc_ptr,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    hessian_power,
    HAS_D: tl.constexpr,
    TILE: tl.constexpr,
    SP: tl.constexpr,
):
    # program -> (tensor i, tile j) from the tile table; addresses from the pointer tables
    i = tl.load(tile_tab + tl.program_id(0) * 2)
    jt = tl.load(tile_tab + tl.program_id(0) * 2 + 1).to(tl.int64)
    nseg_total = tl.load(meta_ptr + i * 4 + 3)
    if jt * TILE < nseg_total:
        row = tl.load(meta_ptr + i * 4)
        seg = tl.load(meta_ptr + i * 4 + 1)
        segs_per_row = tl.load(meta_ptr + i * 4 + 2)
        bc1 = tl.load(bc_ptr + i * 2)
        bc2 = tl.load(bc_ptr + i * 2 + 1)
        p_ptr = tl.load(p_tab + i).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(g_tab + i).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(m_tab + i).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(v_tab + i).to(tl.pointer_type(tl.float32))
        sid = jt * TILE + tl.arange(0, TILE)  # segment ids [TILE]
        t = tl.arange(0, SP)
        r = sid // segs_per_row
        start = (sid % segs_per_row) * seg
        col = start[:, None] + t[None, :]
        msk = (sid[:, None] < nseg_total) & (t[None, :] < seg) & (col < row)
        off = r[:, None] * row + col
        g = tl.load(g_ptr + off, mask=msk, other=0.0)
        m = tl.load(m_ptr + off, mask=msk, other=0.0)
        v = tl.load(v_ptr + off, mask=msk, other=0.0)
        p = tl.load(p_ptr + off, mask=msk, other=0.0)
        m = beta1 * m + (1.0 - beta1) * g
        if HAS_D:
            d_ptr = tl.load(d_tab + i).to(tl.pointer_type(tl.float32))
            d = tl.load(d_ptr + off, mask=msk, other=0.0)
            n = tl.sum(msk.to(tl.float32), axis=1)
            da = tl.sum(d, axis=1) / tl.maximum(n, 1.0)
            v = beta2 * v + (1.0 - beta2) * (da * da)[:, None]
        root = tl.sqrt(v / bc2)
        # root ** power, with 0 ** 0 = 1 as torch.pow has it
        zero_pow = tl.where(hessian_power == 0.0, 1.0, 0.0)
        powed = tl.where(root > 0, tl.exp(hessian_power * tl.log(root)), zero_pow)
        upd = (m / bc1) / (powed + eps) + weight_decay * p
        p = p - lr * upd
        tl.store(m_ptr + off, m, mask=msk)
        tl.store(v_ptr + off, v, mask=msk)
        tl.store(p_ptr + off, p, mask=msk)


def _table(tensors, device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def launch_group(
    params,
    grads,
    diags,
    exp_avgs,
    exp_hessians,
    steps,
    hessian_steps,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    hessian_power,
    block_length,
) -> None:
    """Triton: every float32 parameter of a group, one launch per segment-length class.

    ``diags`` is a list of raw Hessian-diagonal estimates, or ``None`` when this step does not
    refresh the Hessian. Parameters whose averaging segments have the same padded length share a
    launch (all of them when ``block_length == 1`` and no convolution is present).
    """
    if not params:
        return
    dev = params[0].device
    grads = [g.contiguous() for g in grads]
    diags = [d.contiguous() for d in diags] if diags is not None else None
    classes: dict[int, list[int]] = {}
    meta = []
    for i, p in enumerate(params):
        row, seg = segments(p.shape, block_length)
        segs_per_row = math.ceil(row / seg)
        meta.append((row, seg, segs_per_row, (p.numel() // row) * segs_per_row))
        classes.setdefault(next_pow2(seg), []).append(i)
    for sp, idx in classes.items():
        cfg = config(sp)
        tile = cfg["TILE"]
        sel = [params[i] for i in idx]
        bcs = [(1.0 - beta1 ** steps[i], 1.0 - beta2 ** max(hessian_steps[i], 1)) for i in idx]
        counts = [math.ceil(meta[i][3] / tile) for i in idx]
        if sum(counts) == 0:
            continue
        gtab = _table([grads[i] for i in idx], dev)
        _adahessian_kernel[(sum(counts),)](
            tile_table(counts, dev),
            _table(sel, dev),
            gtab,
            _table([diags[i] for i in idx], dev) if diags is not None else gtab,
            _table([exp_avgs[i] for i in idx], dev),
            _table([exp_hessians[i] for i in idx], dev),
            torch.tensor([meta[i] for i in idx], dtype=torch.int64, device=dev),
            torch.tensor(bcs, dtype=torch.float32, device=dev),
            float(lr),
            float(beta1),
            float(beta2),
            float(eps),
            float(weight_decay),
            float(hessian_power),
            HAS_D=diags is not None,
            **cfg,
        )


def reference_group(
    params, grads, diags, exp_avgs, exp_hessians, steps, hessian_steps, **hyper
) -> None:
    """The same update, one parameter at a time through :func:`reference`."""
    for i, p in enumerate(params):
        reference(
            p,
            grads[i],
            diags[i] if diags is not None else None,
            exp_avgs[i],
            exp_hessians[i],
            step=steps[i],
            hessian_step=hessian_steps[i],
            **hyper,
        )


def supported(params, exp_avgs, exp_hessians) -> bool:
    tensors = [*params, *exp_avgs, *exp_hessians]
    return (
        AVAILABLE
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
        and all(segments(p.shape, 1)[1] <= MAX_SEGMENT for p in params)
    )
