"""Structured Optimal Brain Surgeon on a layer's input Hessian: remove whole groups of input columns.

A structure (an attention head, a feed-forward neuron) enters the layer that consumes it as a
group ``S`` of input columns of ``W`` (``[rows, cols]``). With ``H = X^T X`` of that layer's inputs
and ``Hi = H^-1``, removing ``S`` and re-fitting the remaining columns by least squares costs

    err(S) = tr( W[:, S] (Hi[S, S])^-1 W[:, S]^T )

(with ``H = 2/N X^T X`` as the calibration statistics are kept, ``2/N`` times the squared output
error),
and the optimal correction of the remaining columns is ``W -= W[:, S] (Hi[S, S])^-1 Hi[S, :]``
(which zeroes ``W[:, S]``). After removing ``S`` the inverse of ``H`` restricted to the other
columns is ``Hi - Hi[:, S] (Hi[S, S])^-1 Hi[S, :]`` (the Schur complement), so structures are removed
one at a time, greedily, each time the one whose removal costs least given the ones already
removed. ``err`` is the exact increase of ``||W X^T - W' X^T||^2`` (tests check it against a least-
squares refit in float64), not an approximation, since a linear layer's output is quadratic in
its weights.

A consumer with a bias can also absorb the mean of what it loses (``bias=True``): the inputs get a
constant column, the bias becomes a column of ``W`` that is never removed, and the same update
corrects it.

All groups have the same size here (a head is ``head_dim`` columns, or the query heads sharing one
key/value head; a neuron one column), so the scores of every remaining group are one batched solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass
class Removal:
    """The result of removing structures from one consumer: the corrected weights (removed columns
    zero), the bias (or ``None``), the removed structures in order and the cumulative error after
    each removal."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    removed: list[int]
    errors: list[float]


def damped(h: torch.Tensor, rel_damp: float) -> torch.Tensor:
    """``H + rel_damp * mean(diag H) I``, with dead inputs (zero diagonal) given a diagonal of one."""
    h = h.to(F64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    if rel_damp:
        diag += rel_damp * diag.mean()
    return h


def _augment(w, h, bias, mean):
    # [W | b] on [X | 1]: H gains the row and column sum(x) and the corner N (here per token:
    # H = 2/N X^T X, so the cross term is 2 mean(x) and the corner 2)
    n = h.shape[0]
    ha = torch.empty(n + 1, n + 1, dtype=F64, device=h.device)
    ha[:n, :n] = h
    ha[:n, n] = 2.0 * mean
    ha[n, :n] = 2.0 * mean
    ha[n, n] = 2.0
    return torch.cat([w, bias[:, None].to(F64)], dim=1), ha


def remove_structures(
    w: torch.Tensor,
    h: torch.Tensor,
    groups: torch.Tensor,
    count: int,
    *,
    rel_damp: float = 0.01,
    bias: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
) -> Removal:
    """Remove ``count`` of the column ``groups`` (``[G, s]`` indices) of ``w`` greedily with the
    structured OBS update on ``h`` (``2/N X^T X``). ``bias`` and ``mean`` (the inputs' mean): the bias
    is corrected too. Returns a :class:`Removal` (float64)."""
    w = w.to(F64).clone()
    h = damped(h, rel_damp)
    cols = w.shape[1]
    if bias is not None:
        if mean is None:
            raise ValueError("remove_structures: a bias correction needs the inputs' mean")
        w, h = _augment(w, h, bias, mean.to(F64))
    hi = torch.cholesky_inverse(torch.linalg.cholesky(h))
    alive = torch.ones(groups.shape[0], dtype=torch.bool, device=w.device)
    removed, errors, total = [], [], 0.0
    for _ in range(count):
        idx = groups[alive]  # [g, s]
        if idx.shape[1] == 1:  # single columns (neurons): the s x s solves are divisions
            j = idx[:, 0]
            err = (w * w).sum(0)[j] / torch.diagonal(hi)[j]
        else:
            hs = hi[idx[:, :, None], idx[:, None, :]]  # [g, s, s]
            ws = w[:, idx].permute(1, 0, 2)  # [g, rows, s]
            sol = torch.linalg.solve(hs, ws.transpose(1, 2))  # [g, s, rows]
            err = (ws.transpose(1, 2) * sol).sum(dim=(1, 2))
        best = int(torch.argmin(err))
        g = int(torch.nonzero(alive)[best])
        s = groups[g]
        his = hi[s][:, s]
        if len(s) == 1:
            step = hi[s, :] / his
        else:
            step = torch.linalg.solve(his, hi[s, :])  # [s, cols]
        w -= w[:, s] @ step
        w[:, s] = 0.0
        hi -= hi[:, s] @ step
        hi[s, :] = 0.0
        hi[:, s] = 0.0
        hi[s, s] = 1.0  # keeps the removed block invertible; never read again
        alive[g] = False
        removed.append(g)
        total += float(err[best])
        errors.append(total)
    new_bias = w[:, cols].clone() if bias is not None else None
    return Removal(w[:, :cols].contiguous(), new_bias, removed, errors)


def refit_error(w, x, keep: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Reference: the least-squares refit of ``w`` on the kept columns of inputs ``x`` (``[N,
    cols]``) and its squared output error (float64; for tests)."""
    w, x = w.to(F64), x.to(F64)
    target = x @ w.T
    sol = torch.linalg.lstsq(x[:, keep], target).solution  # [kept, rows]
    new = torch.zeros_like(w)
    new[:, keep] = sol.T
    return new, float(((x @ new.T - target) ** 2).sum())
