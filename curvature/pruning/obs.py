r"""Optimal Brain Surgeon on Fisher blocks: the functional core of the pruning engine.

Every function works on one batch of Fisher blocks: weights ``w`` of shape ``[n, B]`` and block
inverses ``hinv = F^-1`` of shape ``[n, B, B]`` (float64), plus a ``valid`` mask ``[n, B]`` that is
False on padding. A *group* is ``g`` consecutive weights inside a block (``g = 1`` unstructured,
``g = 4`` for ``block4``); N:M masks use ``g = 1`` with at most ``M - N`` pruned in every run of
``M`` consecutive weights.

For a group ``Q`` the loss increase and the weight correction are

.. math::  \delta L_Q = \tfrac12 w_Q^\top ([F^{-1}]_{QQ})^{-1} w_Q, \qquad
           \delta w = -F^{-1}_{:,Q} ([F^{-1}]_{QQ})^{-1} w_Q,

and after pruning ``Q`` the inverse of the Fisher restricted to the remaining weights is the
downdate ``F^{-1} - F^{-1}_{:,Q} ([F^{-1}]_{QQ})^{-1} F^{-1}_{Q,:}``.

``greedy_order`` prunes one group at a time with that exact correction and downdate, recording the
loss increase of each step (Optimal Brain Compression). ``independent_scores`` scores every group
once (oBERT), and ``independent_update`` sums their single-group corrections. ``masked_update``
gives the exact joint correction for any pruned set ``S``, ``dw = -F^-1_{:,S} ([F^-1]_{SS})^-1 w_S``,
which equals the end point of the greedy sequence for that set.

References:
    Hassibi, Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon", 1993.
    Kurtic et al., "The Optimal BERT Surgeon", EMNLP 2022.
    Frantar, Singh, Alistarh, "Optimal Brain Compression", NeurIPS 2022.
"""

from __future__ import annotations

import torch

from curvature import kernels

F64 = torch.float64
# Score of a group that must be pruned first (already pruned in an earlier step).
FIXED_SCORE = -1.0


def _group_index(block: int, group: int, device) -> torch.Tensor:
    return torch.arange(block, device=device).view(block // group, group)


def independent_scores(
    w: torch.Tensor, hinv: torch.Tensor, group: int, skip: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n, B/g]`` OBS loss increase of pruning each group alone.

    ``skip`` ``[n, B/g]`` marks groups whose sub-block may be singular (already pruned in a
    greedy pass); their score is meaningless and must be masked by the caller.
    """
    if skip is None:
        return kernels.obs_scores(w, hinv, group)[0]
    n, b = w.shape
    if group == 1:
        diag = torch.diagonal(hinv, dim1=1, dim2=2)
        diag = torch.where(skip, torch.ones_like(diag), diag)
        return w * w / (2.0 * diag)
    idx = _group_index(b, group, w.device)
    sub = hinv[:, idx[:, :, None], idx[:, None, :]]  # [n, G, g, g]
    eye = torch.eye(group, dtype=sub.dtype, device=sub.device)
    sub = torch.where(skip[:, :, None, None], eye, sub)
    wg = w.view(n, b // group, group)
    z = torch.linalg.solve(sub, wg.unsqueeze(-1)).squeeze(-1)
    return 0.5 * (wg * z).sum(-1)


def independent_update(w: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor, group: int):
    """oBERT's summed single-group corrections for the pruned groups; pruned weights set to 0."""
    return kernels.obs_update(w, hinv, pruned, group)


def masked_update(w: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Exact joint OBS correction for the pruned set of each block; pruned weights set to 0.

    Solves ``[F^-1]_SS z = w_S`` for every block at once by embedding it in the SPD matrix
    ``P F^-1 P + (I - P)`` (``P`` the pruned coordinates), so blocks with different sets batch.
    """
    p = pruned.to(hinv.dtype)
    eye = torch.diag_embed(1.0 - p)
    a = p.unsqueeze(-1) * hinv * p.unsqueeze(-2) + eye
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info > 0).any()):  # numerically singular [F^-1]_SS: fall back to least squares
        z = torch.linalg.lstsq(a, (w * p).unsqueeze(-1)).solution.squeeze(-1)
    else:
        z = torch.cholesky_solve((w * p).unsqueeze(-1), chol).squeeze(-1)
    new = w - (hinv @ z.unsqueeze(-1)).squeeze(-1)
    return torch.where(pruned, torch.zeros_like(new), new)


def greedy_order(
    w: torch.Tensor,
    hinv: torch.Tensor,
    valid: torch.Tensor,
    group: int,
    *,
    fixed: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune groups one at a time inside every block, exactly; return the order and the costs.

    Args:
        w, hinv, valid: ``[n, B]``, ``[n, B, B]``, ``[n, B]`` (float64 for ``w`` and ``hinv``).
        group: ``g``, weights per group (``B`` divisible by ``g``).
        fixed: ``[n, B]`` weights already pruned; they are taken first at zero cost.
        nm: ``(N, M)``: at most ``M - N`` pruned in every run of ``M`` weights (``g`` must be 1).
        steps: how many groups to prune per block (default: every valid group, or ``B (M-N)/M``).

    Returns:
        ``order`` ``[n, steps]`` (group index inside the block, ``-1`` once nothing is eligible)
        and ``cost`` ``[n, steps]``, the loss increase of each step (``inf`` where ``order`` is -1).
    """
    n, b = w.shape
    ngroups = b // group
    w = w.clone()
    hinv = hinv.clone()
    idx = _group_index(b, group, w.device)
    valid_g = valid.view(n, ngroups, group).all(-1)
    fixed_g = (
        fixed.view(n, ngroups, group).all(-1) & valid_g
        if fixed is not None
        else torch.zeros_like(valid_g)
    )
    if steps is None:
        steps = b * (nm[1] - nm[0]) // nm[1] if nm else ngroups
    pruned = torch.zeros_like(valid_g)
    order = torch.full((n, steps), -1, dtype=torch.long, device=w.device)
    cost = torch.full((n, steps), float("inf"), dtype=w.dtype, device=w.device)
    rows = torch.arange(n, device=w.device)
    for t in range(steps):
        scores = independent_scores(w, hinv, group, skip=pruned)
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
            h_q = hinv[rows, q]  # [n, B]
            scale = okf / h_q.gather(1, q[:, None]).squeeze(1).where(ok, torch.ones_like(okf))
            w = w - (scale * w_q[:, 0])[:, None] * h_q
            hinv.baddbmm_((h_q * scale[:, None]).unsqueeze(2), h_q.unsqueeze(1), alpha=-1.0)
        else:
            h_q = hinv[rows[:, None], :, cols].transpose(1, 2)  # [n, B, g] = F^-1[:, Q]
            h_qq = hinv[rows[:, None, None], cols[:, :, None], cols[:, None, :]]  # [n, g, g]
            eye = torch.eye(group, dtype=h_qq.dtype, device=h_qq.device)
            h_qq = torch.where(ok[:, None, None], h_qq, eye)  # finished blocks: a harmless solve
            # z = [F^-1]_QQ^-1 w_Q and Y = [F^-1]_QQ^-1 F^-1[Q, :] in one solve
            rhs = torch.cat([w_q.unsqueeze(-1), h_q.transpose(1, 2)], dim=-1)  # [n, g, 1 + B]
            sol = torch.linalg.solve(h_qq, rhs)
            w = w - okf[:, None] * (h_q @ sol[:, :, :1]).squeeze(-1)
            hinv = hinv - okf[:, None, None] * (h_q @ sol[:, :, 1:])
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


def order_to_mask(order: torch.Tensor, counts: torch.Tensor, block: int, group: int):
    """Pruned-coordinate mask ``[n, B]`` taking the first ``counts[i]`` groups of ``order[i]``."""
    n, steps = order.shape
    take = torch.arange(steps, device=order.device)[None, :] < counts[:, None]
    take = take & (order >= 0)
    mask_g = torch.zeros(n, block // group, dtype=torch.bool, device=order.device)
    r = torch.arange(n, device=order.device)[:, None].expand(-1, steps)
    mask_g[r[take], order[take]] = True
    return mask_g.repeat_interleave(group, dim=1)
