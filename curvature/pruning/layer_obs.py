r"""Layer-wise OBS on the input Hessian of one linear layer: SparseGPT, OBC and Wanda.

A linear layer ``y = W x`` (``W`` is ``[rows, cols]``: output by input features) pruned to
``W'`` changes its outputs on the calibration inputs ``X`` (``[N, cols]``) by
``||(W - W') X^T||^2``; per row that is the quadratic form of the layer Hessian

.. math::  H = \tfrac{2}{N} X^\top X ,

the same for every row. The functions here take ``W`` and ``H`` in float64 and return the pruned
weights and mask (``True`` = pruned):

- :func:`sparsegpt`: the column sweep. Columns are visited left to right in blocks of 128; the
  weights of a column are pruned (or kept) and the error is pushed onto the columns to the right
  through the upper Cholesky factor ``U`` of ``H^-1`` (row ``j`` of ``U``, divided by ``U_jj``,
  is the OBS correction with the columns left of ``j`` frozen). Updates inside a block are
  applied at once to the columns after it (lazy batched updates). The mask of a block is chosen
  when the sweep reaches it, from the current weights, by ``w^2 / U_jj^2`` (unstructured: the
  smallest over the whole block; ``N:M``: the smallest ``M - N`` of each run of ``M``).
- :func:`obc`: exact greedy OBS per row (Optimal Brain Compression): the greedy solver of the
  Fisher blocks (:func:`curvature.pruning.obs.greedy_order`) with every row's block inverse set
  to ``H^-1``; the layer's target is then allocated across rows by the rows' loss traces, and the
  kept weights get the exact joint correction of the chosen set.
- :func:`wanda`: ``|W_ij| * ||X_j||_2`` compared within each row; no update.

Damping: ``H + lambda I`` with ``lambda = ratio * mean(diag H)`` (``ratio`` 0.01 by default).
:func:`damped_inverse` retries with ten times the ratio when the Cholesky factorisation fails,
warning with the layer's name, and raises after the last try: it never goes on with an identity
inverse (which would turn the method into magnitude pruning without an update).

Inputs that never fire (``H_jj = 0``) carry no information: their weights are set to zero (they
do not change the outputs on the calibration data) and their diagonal to 1, as SparseGPT does.

References:
    Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
    ICML 2023.
    Frantar, Singh, Alistarh, "Optimal Brain Compression", NeurIPS 2022.
    Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models"
    (Wanda), ICLR 2024.
"""

from __future__ import annotations

import warnings

import torch

from curvature.pruning import obs
from curvature.pruning.allocation import take_cheapest

F64 = torch.float64
DAMP_RATIO = 0.01
RETRIES = 4  # ratios tried: ratio, 10 ratio, 100 ratio, ... (RETRIES + 1 in all)
BLOCK = 128  # SparseGPT's column block


class CholeskyError(ValueError):
    """The damped layer Hessian was not positive definite even at the largest damping."""


def prepare(
    w: torch.Tensor, h: torch.Tensor, dtype: torch.dtype = F64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (``H_jj = 0``): weights to zero, diagonal to 1. Returns copies in ``dtype``."""
    w, h = w.to(dtype).clone(), h.to(dtype).clone()
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    return w, h


def damped_inverse(
    h: torch.Tensor, ratio: float = DAMP_RATIO, *, name: str = "layer", upper: bool = False
) -> tuple[torch.Tensor, float]:
    """``(H + lambda I)^-1`` (or its upper Cholesky factor with ``upper=True``) and the ratio used.

    ``lambda = ratio * mean(diag H)``; on a failed factorisation the ratio is multiplied by 10
    (at most :data:`RETRIES` times) with a warning naming ``name``.
    """
    mean = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    r = ratio
    for attempt in range(RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(h + r * mean * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            if not upper:
                return inv, r
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u, r
        if attempt < RETRIES:
            warnings.warn(
                f"{name}: the layer Hessian damped by {r:g} x its mean diagonal is not positive "
                f"definite; retrying with {10 * r:g}",
                stacklevel=2,
            )
            r *= 10
    raise CholeskyError(
        f"{name}: the layer Hessian is not positive definite even damped by {r:g} x its mean "
        "diagonal; check the calibration data (NaN or infinite activations?)"
    )


def _block_counts(total: int, cols: int, block: int) -> list[int]:
    """Weights to prune in each column block so that the layer's total is exactly ``total``."""
    edges = [round(total * c / cols) for c in [*range(0, cols, block), cols]]
    return [b - a for a, b in zip(edges, edges[1:])]


def sparsegpt(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    fixed: torch.Tensor | None = None,
    ratio: float = DAMP_RATIO,
    block: int = BLOCK,
    name: str = "layer",
    row_weights: torch.Tensor | None = None,
    rounder=None,
    dtype: torch.dtype = F64,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The SparseGPT column sweep. Returns ``(new weights, mask, estimated error)``.

    ``w`` ``[rows, cols]``, ``h`` ``[cols, cols]``; ``sparsity`` is the fraction of the layer to
    prune (unstructured: exactly ``round(sparsity * rows * cols)`` weights, spread over the column
    blocks in proportion to their width; ``N:M``: exactly ``M - N`` per run); ``fixed`` marks
    weights pruned earlier, which stay pruned and count toward the target. The estimated error is
    ``sum (w_q^2 / U_qq^2) / 2`` over the pruned weights, the OBS loss of each step.

    ``row_weights`` (``[rows]``, positive): the objective ``sum_i r_i ||(W_i - W'_i) X||^2`` of
    :mod:`curvature.pruning.fisher_objective`; each row's correction does not depend on its
    weight, so only the comparison of scores across rows (the unstructured choice in a column
    block) and the estimate change. ``None`` is all ones.
    """
    rows, cols = w.shape
    rw = None if row_weights is None else row_weights.to(dtype).to(w.device)[:, None]
    if nm is not None:  # a run of M never straddles two column blocks
        block = max(nm[1], block // nm[1] * nm[1])
    w, h = prepare(w, h, dtype)
    u, _ = damped_inverse(h, ratio, name=name, upper=True)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    fixed = fixed if fixed is not None else torch.zeros_like(mask)
    counts = _block_counts(round(sparsity * rows * cols), cols, block) if nm is None else None
    est = 0.0
    for bi, i1 in enumerate(range(0, cols, block)):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        start = w1.clone() if rounder is not None and rounder.stale else None
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        fx = fixed[:, i1:i2]
        m1 = torch.zeros_like(fx)
        if nm is None:
            score = w1 * w1 / (d1 * d1)[None, :]
            score = (score if rw is None else score * rw).masked_fill(fx, -1.0).flatten()
            k = max(counts[bi], int(fx.sum()))
            if k:
                m1.view(-1)[torch.topk(score, k, largest=False, sorted=False).indices] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                run = w1[:, i : i + nm[1]]
                score = (run * run / (d1[i : i + nm[1]] ** 2)[None, :]).masked_fill(
                    fx[:, i : i + nm[1]], -1.0
                )
                idx = torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices
                m1[:, i : i + nm[1]].scatter_(1, idx, True)
            col = w1[:, i]
            q = torch.where(m1[:, i], torch.zeros_like(col), col)
            if rounder is not None:  # quantized as the sweep reaches it (a zero stays zero)
                rounder.fit_at(i1 + i, w1, start, i1)
                q = rounder.round(i1 + i, q)
            e = (col - q) / d1[i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        mask[:, i1:i2] = m1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        e2 = err1.double() ** 2  # the block's OBS losses, summed once
        est += 0.5 * float(e2.sum() if rw is None else (e2 * rw.double()).sum())
    return torch.where(mask, torch.zeros_like(w), w), mask, est


def wanda(
    w: torch.Tensor,
    h_diag: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Wanda: prune the smallest ``|W_ij| * ||X_j||`` of each row (``N:M``: of each run).

    ``h_diag`` is the diagonal of ``H`` (``2/N ||X_j||^2``: its square root orders like
    ``||X_j||``). Each row prunes ``round(sparsity * cols)`` weights (or ``M - N`` per run);
    ``fixed`` weights are pruned first. The estimated error is ``sum w^2 H_jj / 2`` of the pruned
    weights (the diagonal part of the output change).
    """
    rows, cols = w.shape
    w = w.to(F64)
    if h_diag.dim() == 2:  # the full H (kept when the weights are reconstructed afterwards)
        h_diag = torch.diagonal(h_diag)
    score = w.abs() * torch.sqrt(h_diag.to(F64).clamp_min(0))[None, :]
    if fixed is not None:
        score = score.masked_fill(fixed, -1.0)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    if nm is None:
        k = round(sparsity * cols)
        if fixed is not None:
            k = max(k, int(fixed.sum(1).max()))
        if k:
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    else:
        runs = score.view(rows, cols // nm[1], nm[1])
        idx = torch.topk(runs, nm[1] - nm[0], dim=-1, largest=False).indices
        mask.view(rows, cols // nm[1], nm[1]).scatter_(-1, idx, True)
    est = 0.5 * float((w * w * h_diag.to(F64)[None, :])[mask].sum())
    return torch.where(mask, torch.zeros_like(w), w), mask, est


def obc(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    group: int = 1,
    fixed: torch.Tensor | None = None,
    ratio: float = DAMP_RATIO,
    name: str = "layer",
    chunk_bytes: int = 64 << 20,
    row_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact greedy OBS of every row on ``H^-1`` (OBC). Returns ``(weights, mask, est. error)``.

    Each row is pruned one group at a time with the exact correction and the downdate of its
    inverse (:func:`~curvature.pruning.obs.greedy_order`, the Fisher blocks' greedy solver), which
    records the loss of each step; the layer's ``round(sparsity * rows * cols / group)`` cheapest
    steps are then taken across rows (each row a prefix of its order) and the kept weights get
    the exact joint OBS correction of their row's set. Rows are processed in chunks whose
    ``[n, cols, cols]`` inverse copies fit ``chunk_bytes``.
    """
    rows, cols = w.shape
    w, h = prepare(w, h)
    hinv, _ = damped_inverse(h, ratio, name=name)
    fixed = fixed if fixed is not None else torch.zeros(rows, cols, dtype=torch.bool)
    fixed = fixed.to(w.device)
    valid = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    step = max(1, chunk_bytes // (cols * cols * 8))
    orders, costs = [], []
    for s in range(0, rows, step):
        sl = slice(s, min(rows, s + step))
        n = sl.stop - sl.start
        o, c = obs.greedy_order(
            w[sl], hinv.expand(n, cols, cols), valid[sl], group, fixed=fixed[sl], nm=nm
        )
        orders.append(o)
        costs.append(c)
    order, cost = torch.cat(orders), torch.cat(costs)
    if row_weights is not None:
        rw = row_weights.to(F64).to(cost.device)[:, None]
        cost = torch.where(cost > obs.FIXED_SCORE, cost * rw, cost)
    if nm is not None:
        counts = (order >= 0).sum(1)
    else:
        k = max(round(sparsity * rows * cols / group), int(fixed.sum()) // group)
        counts = take_cheapest([cost], k)[0]
    mask = obs.order_to_mask(order, counts, cols, group)
    new = torch.empty_like(w)
    for s in range(0, rows, step):
        sl = slice(s, min(rows, s + step))
        n = sl.stop - sl.start
        new[sl] = obs.masked_update(w[sl], hinv.expand(n, cols, cols), mask[sl])
    taken = torch.arange(order.shape[1], device=w.device)[None, :] < counts[:, None]
    est = float(cost[taken & torch.isfinite(cost)].clamp_min(0).sum())
    return new, mask, est
