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
update kernel reads each block once, a tile of rows at a time, and writes the weights fused with
the zeroing. The torch references do the same math with ``torch.linalg.solve`` and batched
products.

**Greedy OBS** (the default pruning mode, Optimal Brain Compression): :func:`reference_greedy`
prunes one group at a time inside every block, each step the exact OBS correction of the weights
and the downdate of the block inverse, and records the order and the loss increase of each step.
The greedy kernel runs that whole sequence for a block in one program with the block inverse in
registers (blocks up to :data:`GREEDY_MAX_BLOCK`); a group of ``g`` weights is removed as ``g``
scalar eliminations, which by the quotient property of Schur complements give the same correction
and downdate as the ``g x g`` joint solve of the reference.

Precision: every kernel accumulates in float64 whatever the storage dtype.
"""

from __future__ import annotations

import torch

from ._triton import AVAILABLE, jit, next_pow2, tl

#: Score of a group that must be pruned first (already pruned in an earlier step).
FIXED_SCORE = -1.0
#: The largest block the greedy kernel holds in registers without spilling (sm_80, sm_90).
GREEDY_MAX_BLOCK = 64
#: The largest block the scoring and update kernels take.
MAX_BLOCK = 256
#: The group sizes and N:M run lengths the kernels take (what the compile check covers).
GROUPS = (1, 2, 4)
NM_RUNS = (2, 4, 8, 16)


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
def _load_groups(w_ptr, h_ptr, blk, bsz, ngroups, GP: tl.constexpr, Q: tl.constexpr):
    s = tl.arange(0, GP)
    i = tl.arange(0, Q)
    ms = s < ngroups
    col = s[:, None] * Q + i[None, :]  # [GP, Q] weight index in the block
    w = tl.load(w_ptr + blk * bsz + col, mask=ms[:, None], other=0.0)
    rows = col[:, :, None]
    cols = s[:, None, None] * Q + i[None, None, :]
    eye = (i[None, :, None] == i[None, None, :]) & (~ms[:, None, None])  # identity on padding
    a = tl.load(h_ptr + blk * bsz * bsz + rows * bsz + cols, mask=ms[:, None, None], other=0.0)
    return w.to(tl.float64), a.to(tl.float64) + eye.to(tl.float64), ms


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
):
    blk = tl.program_id(0).to(tl.int64)
    if NM_M > 1:  # unstructured scores laid out as runs of M, then ranked inside each run
        r = tl.arange(0, GP)
        c = tl.arange(0, NM_M)
        mr = r < ngroups
        col = r[:, None] * NM_M + c[None, :]
        w = tl.load(w_ptr + blk * bsz + col, mask=mr[:, None], other=0.0).to(tl.float64)
        d = tl.load(h_ptr + blk * bsz * bsz + col * (bsz + 1), mask=mr[:, None], other=1.0)
        d = d.to(tl.float64)
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
        w, a, ms = _load_groups(w_ptr, h_ptr, blk, bsz, ngroups, GP, Q)
        z = _solve_groups(w, a, GP, Q)
        score = 0.5 * tl.sum(w * z, axis=1)
        s = tl.arange(0, GP)
        tl.store(out_ptr + blk * ngroups + s, score, mask=ms)


@jit
def _update_kernel(
    w_ptr, h_ptr, p_ptr, out_ptr, bsz, ngroups, GP: tl.constexpr, Q: tl.constexpr, RT: tl.constexpr
):
    blk = tl.program_id(0).to(tl.int64)
    w, a, ms = _load_groups(w_ptr, h_ptr, blk, bsz, ngroups, GP, Q)
    s = tl.arange(0, GP)
    i = tl.arange(0, Q)
    col = s[:, None] * Q + i[None, :]
    pruned = tl.load(p_ptr + blk * bsz + col, mask=ms[:, None], other=0) != 0
    z = _solve_groups(w, a, GP, Q)
    coef = tl.reshape(tl.where(pruned, z, 0.0), (GP * Q,))  # c, laid out like the block
    c = tl.arange(0, GP * Q)
    mc = c < bsz
    for r0 in range(0, bsz, RT):  # H c a tile of RT rows at a time: the block never on chip whole
        r = r0 + tl.arange(0, RT)
        mr = r < bsz
        h = tl.load(
            h_ptr + blk * bsz * bsz + r[:, None] * bsz + c[None, :],
            mask=mr[:, None] & mc[None, :],
            other=0.0,
        )
        corr = tl.sum(h.to(tl.float64) * coef[None, :], axis=1)
        wv = tl.load(w_ptr + blk * bsz + r, mask=mr, other=0.0).to(tl.float64)
        pv = tl.load(p_ptr + blk * bsz + r, mask=mr, other=0) != 0
        new = tl.where(pv, 0.0, wv - corr)
        tl.store(out_ptr + blk * bsz + r, new.to(out_ptr.dtype.element_ty), mask=mr)


@jit
def _greedy_kernel(
    w_ptr,
    h_ptr,
    flag_ptr,
    order_ptr,
    cost_ptr,
    bsz,
    ngroups,
    steps,
    BP: tl.constexpr,
    GP: tl.constexpr,
    Q: tl.constexpr,
    NM_M: tl.constexpr,
    NM_PRUNE: tl.constexpr,
):
    """One block per program: ``steps`` greedy OBS prunes with the block inverse in registers.

    ``flag`` per group: 0 eligible, 1 fixed (pruned earlier, taken first), 2 never (padding).
    """
    blk = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BP)
    mr = r < bsz
    ri = r[:, None]
    ci = r[None, :]
    h = tl.load(
        h_ptr + blk * bsz * bsz + ri * bsz + ci, mask=mr[:, None] & mr[None, :], other=0.0
    ).to(tl.float64)
    h = h + ((ri == ci) & (ri >= bsz)).to(tl.float64)  # identity on the padding
    w = tl.load(w_ptr + blk * bsz + r, mask=mr, other=0.0).to(tl.float64)
    s = tl.arange(0, GP)
    flag = tl.load(flag_ptr + blk * ngroups + s, mask=s < ngroups, other=2)
    pruned = s < 0  # all False, [GP]
    for t in range(steps):
        # scores of every group under the current inverse (pruned groups masked below)
        if Q == 1:
            diag = tl.sum(tl.where(ri == ci, h, 0.0), axis=1)
            diag = tl.where(pruned, 1.0, diag)
            score = w * w / (2.0 * diag)
        else:
            q = tl.arange(0, Q)
            # the diagonal Q x Q sub-blocks [GP, Q, Q], one column of each per pass over h
            sub = tl.zeros((GP, Q, Q), dtype=tl.float64)
            for b in tl.static_range(Q):
                col = tl.sum(tl.where(ci == (ri // Q) * Q + b, h, 0.0), axis=1)  # h[i, grp(i)+b]
                sub += tl.where(q[None, None, :] == b, tl.reshape(col, (GP, Q))[:, :, None], 0.0)
            eye = (q[None, :, None] == q[None, None, :]) & pruned[:, None, None]
            sub = tl.where(pruned[:, None, None], 0.0, sub) + eye.to(tl.float64)
            wg = tl.reshape(w, (GP, Q))
            score = 0.5 * tl.sum(wg * _solve_groups(wg, sub, GP, Q), axis=1)
        score = tl.where(score != score, float("inf"), score)  # NaN (degenerate): never
        score = tl.where((flag == 1) & ~pruned, -1.0, score)  # FIXED_SCORE
        blocked = pruned | (flag == 2)
        if NM_M > 1:  # at most NM_PRUNE pruned in every run of NM_M weights
            runs = tl.sum(tl.reshape(pruned.to(tl.int32), (GP // NM_M, NM_M)), axis=1)
            full = tl.reshape(
                tl.broadcast_to((runs >= NM_PRUNE)[:, None], (GP // NM_M, NM_M)), (GP,)
            )
            blocked = blocked | full
        score = tl.where(blocked, float("inf"), score)
        best = tl.min(score, axis=0)
        ok = best < float("inf")
        pick = tl.min(tl.where(score == best, s, GP), axis=0)  # ties: the lowest index
        okf = ok.to(tl.float64)
        for e in tl.static_range(Q):  # the group as Q scalar eliminations
            c = pick * Q + e
            h_c = tl.sum(tl.where(ri == c, h, 0.0), axis=0)  # row c = column c
            h_cc = tl.sum(tl.where(r == c, h_c, 0.0), axis=0)
            w_c = tl.sum(tl.where(r == c, w, 0.0), axis=0)
            scale = okf / tl.where(ok, h_cc, 1.0)
            w = w - (scale * w_c) * h_c
            h = h - (h_c[:, None] * scale) * h_c[None, :]
        taken = tl.where(ok, pick, -1)  # -1: nothing taken at this step
        w = tl.where(r // Q == taken, 0.0, w)
        pruned = pruned | (s == taken)
        cost = tl.where(best == -1.0, best, tl.maximum(best, 0.0))  # FIXED_SCORE kept
        tl.store(order_ptr + blk * steps + t, tl.where(ok, pick, -1).to(tl.int64))
        tl.store(cost_ptr + blk * steps + t, tl.where(ok, cost, float("inf")))


def _check_group(bsz: int, group: int) -> None:
    if group < 1 or group & (group - 1) or bsz % group:
        raise ValueError(f"group must be a power of two dividing the block size {bsz}, got {group}")


def scores_config(bsz: int, group: int, nm: tuple[int, int] | None = None) -> dict:
    """Constexprs and warps of the scoring kernel (one place for the launcher and the checks)."""
    m = nm[1] if nm else 1
    return {
        "GP": next_pow2(bsz // (m if nm else group)),
        "Q": 1 if nm else group,
        "NM_M": m,
        "NM_PRUNE": m - nm[0] if nm else 0,
        "num_warps": 8 if bsz >= 128 else 4,
    }


def launch_scores(w, h, group: int, nm: tuple[int, int] | None = None):
    """Triton: scores ``[n, B/g]``, and for ``nm=(N, M)`` (``g = 1``) also the N:M pruned mask."""
    n, bsz = w.shape
    _check_group(bsz, group)
    w, h = w.contiguous(), h.contiguous()
    out_dtype = torch.float64 if torch.float64 in (w.dtype, h.dtype) else torch.float32
    cfg = scores_config(bsz, group, nm)
    if nm is not None:
        scores = torch.empty(n, bsz, dtype=out_dtype, device=w.device)
        mask = torch.empty(n, bsz, dtype=torch.int8, device=w.device)
        _scores_kernel[(n,)](w, h, scores, mask, bsz, bsz // nm[1], **cfg)
        return scores, mask.bool()
    scores = torch.empty(n, bsz // group, dtype=out_dtype, device=w.device)
    _scores_kernel[(n,)](w, h, scores, scores, bsz, bsz // group, **cfg)
    return scores, None


def update_config(bsz: int, group: int) -> dict:
    """Constexprs and warps of the update kernel for a block size and group (one place)."""
    bp = next_pow2(bsz)
    return {
        "GP": next_pow2(bsz // group),
        "Q": group,
        "RT": min(bp, max(16, 2048 // bp)),  # rows of H per pass: tiles of 2048-4096 values
        "num_warps": 8 if bsz >= 32 else (4 if bsz >= 16 else 2),
    }


def launch_update(w, h, pruned, group: int):
    """Triton: the oBERT weight update of every block, fused with zeroing the pruned weights."""
    n, bsz = w.shape
    _check_group(bsz, group)
    w, h = w.contiguous(), h.contiguous()
    out = torch.empty_like(w)
    _update_kernel[(n,)](
        w,
        h,
        pruned.contiguous().to(torch.int8),
        out,
        bsz,
        bsz // group,
        **update_config(bsz, group),
    )
    return out


def greedy_config(bsz: int, group: int, nm: tuple[int, int] | None = None) -> dict:
    """Constexprs and warps of the greedy kernel (one place for the launcher and the checks)."""
    bp = next_pow2(bsz)
    return {
        "BP": bp,
        "GP": bp // group,
        "Q": group,
        "NM_M": nm[1] if nm else 1,
        "NM_PRUNE": nm[1] - nm[0] if nm else 0,
        "num_warps": 16 if bp >= 64 else (8 if bp >= 32 else 4),
    }


def _group_flags(valid_g, fixed_g):
    """0 eligible, 1 fixed (taken first), 2 never (padding), as the greedy kernel reads them."""
    flag = torch.where(fixed_g & valid_g, 1, 0)
    return torch.where(valid_g, flag, 2).to(torch.int8).contiguous()


def _greedy_setup(w, valid, group, fixed, nm, steps):
    n, b = w.shape
    _check_group(b, group)
    if nm is not None and group != 1:
        raise ValueError("N:M masks are over single weights: group must be 1")
    ngroups = b // group
    valid_g = valid.view(n, ngroups, group).all(-1)
    fixed_g = (
        fixed.view(n, ngroups, group).all(-1) & valid_g
        if fixed is not None
        else torch.zeros_like(valid_g)
    )
    if steps is None:
        steps = b * (nm[1] - nm[0]) // nm[1] if nm else ngroups
    return ngroups, valid_g, fixed_g, steps


def launch_greedy(w, h, valid, group: int, fixed=None, nm=None, steps=None):
    """Triton: the greedy OBS order and costs of every block (see :func:`reference_greedy`)."""
    n, b = w.shape
    ngroups, valid_g, fixed_g, steps = _greedy_setup(w, valid, group, fixed, nm, steps)
    if b > GREEDY_MAX_BLOCK:
        raise ValueError(f"the greedy kernel takes blocks up to {GREEDY_MAX_BLOCK}, got {b}")
    order = torch.full((n, steps), -1, dtype=torch.long, device=w.device)
    cost = torch.full((n, steps), float("inf"), dtype=torch.float64, device=w.device)
    if n == 0 or steps == 0:
        return order, cost
    _greedy_kernel[(n,)](
        w.contiguous(),
        h.contiguous(),
        _group_flags(valid_g, fixed_g),
        order,
        cost,
        b,
        ngroups,
        steps,
        **greedy_config(b, group, nm),
    )
    return order, cost


def _group_index(block: int, group: int, device) -> torch.Tensor:
    return torch.arange(block, device=device).view(block // group, group)


def skip_scores(w, h, group: int, skip: torch.Tensor) -> torch.Tensor:
    """Independent scores with the groups in ``skip`` (possibly singular sub-blocks) made safe;
    their values are meaningless and must be masked by the caller."""
    n, b = w.shape
    if group == 1:
        diag = torch.diagonal(h, dim1=1, dim2=2)
        diag = torch.where(skip, torch.ones_like(diag), diag)
        return w * w / (2.0 * diag)
    idx = _group_index(b, group, w.device)
    sub = h[:, idx[:, :, None], idx[:, None, :]]  # [n, G, g, g]
    eye = torch.eye(group, dtype=sub.dtype, device=sub.device)
    sub = torch.where(skip[:, :, None, None], eye, sub)
    wg = w.view(n, b // group, group)
    z = torch.linalg.solve(sub, wg.unsqueeze(-1)).squeeze(-1)
    return 0.5 * (wg * z).sum(-1)


def reference_greedy(w, h, valid, group: int, fixed=None, nm=None, steps=None):
    """Prune groups one at a time inside every block, exactly; return the order and the costs.

    Args:
        w, h, valid: ``[n, B]``, ``[n, B, B]`` (the block inverses), ``[n, B]`` (False on padding).
        group: ``g``, weights per group (``B`` divisible by ``g``).
        fixed: ``[n, B]`` weights already pruned; they are taken first at :data:`FIXED_SCORE`.
        nm: ``(N, M)``: at most ``M - N`` pruned in every run of ``M`` weights (``g`` must be 1).
        steps: how many groups to prune per block (default: every valid group, or ``B (M-N)/M``).

    Returns:
        ``order`` ``[n, steps]`` (group index inside the block, ``-1`` once nothing is eligible)
        and ``cost`` ``[n, steps]`` float64, the loss increase of each step (``inf`` where
        ``order`` is -1). Ties go to the lowest group index.
    """
    n, b = w.shape
    ngroups, valid_g, fixed_g, steps = _greedy_setup(w, valid, group, fixed, nm, steps)
    w = w.to(torch.float64)  # a copy unless already float64
    h = h.to(torch.float64)
    w = w.clone()
    h = h.clone()
    idx = _group_index(b, group, w.device)
    pruned = torch.zeros_like(valid_g)
    order = torch.full((n, steps), -1, dtype=torch.long, device=w.device)
    cost = torch.full((n, steps), float("inf"), dtype=w.dtype, device=w.device)
    rows = torch.arange(n, device=w.device)
    for t in range(steps):
        scores = skip_scores(w, h, group, pruned)
        scores = scores.masked_fill(scores.isnan(), float("inf"))  # degenerate: never chosen
        scores = torch.where(fixed_g & ~pruned, torch.full_like(scores, FIXED_SCORE), scores)
        blocked = pruned | ~valid_g
        if nm is not None:
            per_run = pruned.view(n, b // nm[1], nm[1]).sum(-1, keepdim=True)
            full = (per_run >= nm[1] - nm[0]).expand(-1, -1, nm[1]).reshape(n, b)
            blocked = blocked | full
        scores = scores.masked_fill(blocked, float("inf"))
        best, q = scores.min(dim=1)
        ok = torch.isfinite(best)
        if not bool(ok.any()):
            break
        okf = ok.to(w.dtype)
        cols = idx[q]  # [n, g]
        w_q = w[rows[:, None], cols]  # [n, g]
        if group == 1:  # the common case: a scalar pivot, F^-1[:, q] is row q (symmetry)
            h_q = h[rows, q]  # [n, B]
            scale = okf / h_q.gather(1, q[:, None]).squeeze(1).where(ok, torch.ones_like(okf))
            w = w - (scale * w_q[:, 0])[:, None] * h_q
            h.baddbmm_((h_q * scale[:, None]).unsqueeze(2), h_q.unsqueeze(1), alpha=-1.0)
        else:
            h_q = h[rows[:, None], :, cols].transpose(1, 2)  # [n, B, g] = F^-1[:, Q]
            h_qq = h[rows[:, None, None], cols[:, :, None], cols[:, None, :]]  # [n, g, g]
            eye = torch.eye(group, dtype=h_qq.dtype, device=h_qq.device)
            h_qq = torch.where(ok[:, None, None], h_qq, eye)  # finished blocks: a harmless solve
            # z = [F^-1]_QQ^-1 w_Q and Y = [F^-1]_QQ^-1 F^-1[Q, :] in one solve
            rhs = torch.cat([w_q.unsqueeze(-1), h_q.transpose(1, 2)], dim=-1)  # [n, g, 1 + B]
            sol = torch.linalg.solve(h_qq, rhs)
            w = w - okf[:, None] * (h_q @ sol[:, :, :1]).squeeze(-1)
            h = h - okf[:, None, None] * (h_q @ sol[:, :, 1:])
        w[rows[:, None], cols] = torch.where(
            ok[:, None], torch.zeros_like(w_q), w[rows[:, None], cols]
        )
        pruned[rows[ok], q[ok]] = True
        order[ok, t] = q[ok]
        # fixed groups keep FIXED_SCORE, below every real cost, so the allocation always takes
        # them first (a cost of 0 would tie with weights that are exactly 0)
        c = best[ok]
        cost[ok, t] = torch.where(c == FIXED_SCORE, c, c.clamp_min(0.0))
    return order, cost


def greedy_supported(w: torch.Tensor, group: int, nm=None) -> bool:
    bsz = w.shape[-1]
    ok_group = group in GROUPS and bsz % group == 0
    ok_nm = nm is None or (group == 1 and nm[1] in NM_RUNS and next_pow2(bsz) % nm[1] == 0)
    return AVAILABLE and ok_group and ok_nm and bsz <= GREEDY_MAX_BLOCK


def supported(w: torch.Tensor, group: int, nm=None) -> bool:
    bsz = w.shape[-1]
    ok_group = group in GROUPS and bsz % group == 0
    ok_nm = nm is None or (group == 1 and nm[1] in NM_RUNS and bsz % nm[1] == 0)
    return AVAILABLE and ok_group and ok_nm and bsz <= MAX_BLOCK
