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
from curvature.kernels import obs as _kernel_obs

F64 = torch.float64
#: Score of a group that must be pruned first (already pruned in an earlier step).
FIXED_SCORE = _kernel_obs.FIXED_SCORE


def independent_scores(
    w: torch.Tensor, hinv: torch.Tensor, group: int, skip: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n, B/g]`` OBS loss increase of pruning each group alone.

    ``skip`` ``[n, B/g]`` marks groups whose sub-block may be singular (already pruned in a
    greedy pass); their score is meaningless and must be masked by the caller.
    """
    if skip is None:
        return kernels.obs_scores(w, hinv, group)[0]
    return _kernel_obs.skip_scores(w, hinv, group, skip)


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

    Runs through :func:`curvature.kernels.obs_greedy`: the greedy kernel (one program per block,
    the whole sequence on chip) for CUDA tensors, the torch reference otherwise.
    """
    return kernels.obs_greedy(w, hinv, valid, group, fixed=fixed, nm=nm, steps=steps)


def order_to_mask(order: torch.Tensor, counts: torch.Tensor, block: int, group: int):
    """Pruned-coordinate mask ``[n, B]`` taking the first ``counts[i]`` groups of ``order[i]``."""
    n, steps = order.shape
    take = torch.arange(steps, device=order.device)[None, :] < counts[:, None]
    take = take & (order >= 0)
    mask_g = torch.zeros(n, block // group, dtype=torch.bool, device=order.device)
    r = torch.arange(n, device=order.device)[:, None].expand(-1, steps)
    mask_g[r[take], order[take]] = True
    return mask_g.repeat_interleave(group, dim=1)
