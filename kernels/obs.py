r"""OBS scoring, N:M selection and the OBS weight update on Fisher blocks.

For weights ``w [n, B]`` and block inverses ``H = F^{-1} [n, B, B]``, with groups of ``g``
consecutive weights inside a block (``g = 1`` unstructured, ``g = 4`` for block4):

.. math::  s_Q = \tfrac12 w_Q^\top (H_{QQ})^{-1} w_Q, \qquad
           w \leftarrow w - H\, c, \quad c_Q = (H_{QQ})^{-1} w_Q \text{ for pruned } Q,\ 0 \text{ otherwise},

then the pruned weights are set to exactly zero (the oBERT update: single-group corrections of
all pruned groups summed). N:M selection marks, in every run of ``M`` consecutive scores, the
``M - N`` lowest (ties go to the lower index).

The Triton kernels solve the ``g x g`` systems on chip by Gauss-Jordan elimination (``g`` is a
power of two; the diagonal is the pivot, safe for the SPD sub-blocks of an inverse Fisher), and the
update kernel reads each block once and writes the weights fused with the zeroing. The torch
references do the same math with ``torch.linalg.solve`` and batched products.
"""

from __future__ import annotations

import torch

from ._triton import AVAILABLE, acc_is_f64, jit, next_pow2, tl


def _sub_blocks(h: torch.Tensor, group: int) -> torch.Tensor:
    n, b, _ = h.shape
    idx = torch.arange(b, device=h.device).view(b // group, group)
    return h[:, idx[:, :, None], idx[:, None, :]]  # [n, G, g, g]


def reference_scores(w: torch.Tensor, h: torch.Tensor, group: int) -> torch.Tensor:
    """``[n, B/g]`` loss increase of pruning each group alone."""
    n, b = w.shape
    if group == 1:
        return w * w / (2.0 * torch.diagonal(h, dim1=1, dim2=2))
    wg = w.view(n, b // group, group)
    z = torch.linalg.solve(_sub_blocks(h, group), wg.unsqueeze(-1)).squeeze(-1)
    return 0.5 * (wg * z).sum(-1)


def reference_nm_select(scores: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """Bool mask, True where pruned: in every run of ``m`` the ``m - n_keep`` lowest scores."""
    runs = scores.reshape(-1, m)
    idx = torch.arange(m, device=scores.device)
    si, sj = runs[:, :, None], runs[:, None, :]
    less = (sj < si) | ((sj == si) & (idx[None, None, :] < idx[None, :, None]))
    rank = less.sum(-1)
    return (rank < m - n_keep).view_as(scores)


def reference_update(
    w: torch.Tensor, h: torch.Tensor, pruned: torch.Tensor, group: int
) -> torch.Tensor:
    """oBERT's summed single-group corrections for the pruned groups; pruned weights set to 0."""
    n, b = w.shape
    if group == 1:
        coef = torch.where(pruned, w / torch.diagonal(h, dim1=1, dim2=2), torch.zeros_like(w))
    else:
        wg = w.view(n, b // group, group)
        z = torch.linalg.solve(_sub_blocks(h, group), wg.unsqueeze(-1)).squeeze(-1)
        coef = torch.where(pruned.view(n, b // group, group), z, torch.zeros_like(z)).view(n, b)
    new = w - (h @ coef.unsqueeze(-1)).squeeze(-1)
    return torch.where(pruned, torch.zeros_like(new), new)


@jit
def _solve_groups(w, a, GP: tl.constexpr, Q: tl.constexpr):
    """Solve ``a[s] z[s] = w[s]`` for ``GP`` groups of size ``Q`` (Gauss-Jordan, diagonal pivots)."""
    i = tl.arange(0, Q)
    ri = i[None, :, None]
    ci = i[None, None, :]
    x = w
    for p in tl.static_range(Q):
        rowp = tl.sum(tl.where(ri == p, a, 0.0), axis=1)  # a[s, p, :]   [GP, Q]
        colp = tl.sum(tl.where(ci == p, a, 0.0), axis=2)  # a[s, :, p]   [GP, Q]
        piv = tl.sum(tl.where(i[None, :] == p, rowp, 0.0), axis=1)  # [GP]
        xp = tl.sum(tl.where(i[None, :] == p, x, 0.0), axis=1)  # [GP]
        factor = tl.where(i[None, :] == p, 0.0, colp / piv[:, None])
        a = a - factor[:, :, None] * rowp[:, None, :]
        x = x - factor * xp[:, None]
    diag = tl.sum(tl.where(ri == ci, a, 0.0), axis=2)
    return x / diag


@jit
def _load_groups(
    w_ptr, h_ptr, blk, bsz, ngroups, GP: tl.constexpr, Q: tl.constexpr, F64: tl.constexpr
):
    s = tl.arange(0, GP)
    i = tl.arange(0, Q)
    ms = s < ngroups
    col = s[:, None] * Q + i[None, :]  # [GP, Q] weight index in the block
    w = tl.load(w_ptr + blk * bsz + col, mask=ms[:, None], other=0.0)
    rows = col[:, :, None]
    cols = s[:, None, None] * Q + i[None, None, :]
    eye = (i[None, :, None] == i[None, None, :]) & (~ms[:, None, None])  # identity on padding
    a = tl.load(h_ptr + blk * bsz * bsz + rows * bsz + cols, mask=ms[:, None, None], other=0.0)
    if F64:
        w = w.to(tl.float64)
        a = a.to(tl.float64) + eye.to(tl.float64)
    else:
        w = w.to(tl.float32)
        a = a.to(tl.float32) + eye.to(tl.float32)
    return w, a, ms


@jit
def _scores_kernel(
    w_ptr,
    h_ptr,
    out_ptr,
    mask_ptr,
    bsz,
    ngroups,
    GP: tl.constexpr,
    Q: tl.constexpr,
    NM_M: tl.constexpr,
    NM_PRUNE: tl.constexpr,
    F64: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    if NM_M > 1:  # unstructured scores laid out as runs of M, then ranked inside each run
        r = tl.arange(0, GP)
        c = tl.arange(0, NM_M)
        mr = r < ngroups
        col = r[:, None] * NM_M + c[None, :]
        w = tl.load(w_ptr + blk * bsz + col, mask=mr[:, None], other=0.0)
        d = tl.load(h_ptr + blk * bsz * bsz + col * (bsz + 1), mask=mr[:, None], other=1.0)
        if F64:
            w = w.to(tl.float64)
            d = d.to(tl.float64)
        else:
            w = w.to(tl.float32)
            d = d.to(tl.float32)
        score = w * w / (2.0 * d)
        si = score[:, :, None]
        sj = score[:, None, :]
        ci = c[None, :, None]
        cj = c[None, None, :]
        less = (sj < si) | ((sj == si) & (cj < ci))
        rank = tl.sum(less.to(tl.int32), axis=2)
        tl.store(out_ptr + blk * bsz + col, score, mask=mr[:, None])
        tl.store(mask_ptr + blk * bsz + col, (rank < NM_PRUNE).to(tl.int8), mask=mr[:, None])
    else:
        w, a, ms = _load_groups(w_ptr, h_ptr, blk, bsz, ngroups, GP, Q, F64)
        z = _solve_groups(w, a, GP, Q)
        score = 0.5 * tl.sum(w * z, axis=1)
        s = tl.arange(0, GP)
        tl.store(out_ptr + blk * ngroups + s, score, mask=ms)


@jit
def _update_kernel(
    w_ptr, h_ptr, p_ptr, out_ptr, bsz, ngroups, GP: tl.constexpr, Q: tl.constexpr, F64: tl.constexpr
):
    blk = tl.program_id(0).to(tl.int64)
    w, a, ms = _load_groups(w_ptr, h_ptr, blk, bsz, ngroups, GP, Q, F64)
    s = tl.arange(0, GP)
    i = tl.arange(0, Q)
    col = s[:, None] * Q + i[None, :]
    pruned = tl.load(p_ptr + blk * bsz + col, mask=ms[:, None], other=0) != 0
    z = _solve_groups(w, a, GP, Q)
    coef = tl.reshape(tl.where(pruned, z, 0.0), (GP * Q,))  # c, laid out like the block
    r = tl.arange(0, GP * Q)
    mr = r < bsz
    h = tl.load(
        h_ptr + blk * bsz * bsz + r[:, None] * bsz + r[None, :],
        mask=mr[:, None] & mr[None, :],
        other=0.0,
    )
    h = h.to(coef.dtype)
    corr = tl.sum(h * coef[None, :], axis=1)  # H c
    wv = tl.load(w_ptr + blk * bsz + r, mask=mr, other=0.0).to(coef.dtype)
    pv = tl.load(p_ptr + blk * bsz + r, mask=mr, other=0) != 0
    new = tl.where(pv, 0.0, wv - corr)
    tl.store(out_ptr + blk * bsz + r, new.to(out_ptr.dtype.element_ty), mask=mr)


def _check_group(bsz: int, group: int) -> None:
    if group < 1 or group & (group - 1) or bsz % group:
        raise ValueError(f"group must be a power of two dividing the block size {bsz}, got {group}")


def launch_scores(w, h, group: int, nm: tuple[int, int] | None = None):
    """Triton: scores ``[n, B/g]``, and for ``nm=(N, M)`` (``g = 1``) also the N:M pruned mask."""
    n, bsz = w.shape
    _check_group(bsz, group)
    w, h = w.contiguous(), h.contiguous()
    f64 = acc_is_f64(w, h)
    out_dtype = torch.float64 if f64 else torch.float32
    if nm is not None:
        keep, m = nm
        ngroups = bsz // m
        scores = torch.empty(n, bsz, dtype=out_dtype, device=w.device)
        mask = torch.empty(n, bsz, dtype=torch.int8, device=w.device)
        _scores_kernel[(n,)](
            w,
            h,
            scores,
            mask,
            bsz,
            ngroups,
            GP=next_pow2(ngroups),
            Q=1,
            NM_M=m,
            NM_PRUNE=m - keep,
            F64=f64,
        )
        return scores, mask.bool()
    ngroups = bsz // group
    scores = torch.empty(n, ngroups, dtype=out_dtype, device=w.device)
    _scores_kernel[(n,)](
        w,
        h,
        scores,
        scores,
        bsz,
        ngroups,
        GP=next_pow2(ngroups),
        Q=group,
        NM_M=1,
        NM_PRUNE=0,
        F64=f64,
    )
    return scores, None


def launch_update(w, h, pruned, group: int):
    """Triton: the oBERT weight update of every block, fused with zeroing the pruned weights."""
    n, bsz = w.shape
    _check_group(bsz, group)
    w, h = w.contiguous(), h.contiguous()
    out = torch.empty_like(w)
    ngroups = bsz // group
    _update_kernel[(n,)](
        w,
        h,
        pruned.contiguous().to(torch.int8),
        out,
        bsz,
        ngroups,
        GP=next_pow2(ngroups),
        Q=group,
        F64=acc_is_f64(w, h),
        num_warps=8 if bsz >= 64 else 4,
    )
    return out


def supported(w: torch.Tensor, group: int, nm=None) -> bool:
    bsz = w.shape[-1]
    ok_group = group >= 1 and not group & (group - 1) and bsz % group == 0
    ok_nm = nm is None or (group == 1 and not nm[1] & (nm[1] - 1) and bsz % nm[1] == 0)
    return AVAILABLE and ok_group and ok_nm and bsz <= 256
