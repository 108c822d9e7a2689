"""Solver parts: which groups of weights to prune, in what order, and how to correct the rest.

A :class:`Solver` has two stages:

- ``order(target, w, curvature, structure, fixed)``: per block, the order in which its groups would
  be pruned and the loss increase of each step (``[n, B/g]`` each; order ``-1`` and cost ``inf``
  mark groups that can never be pruned, such as the padding);
- ``update(target, w, curvature, pruned, structure)``: the new weights of the block rows once the
  allocation has chosen the ``pruned`` mask (pruned weights exactly zero).

``w`` is ``[num_blocks, B]`` float64; ``fixed`` marks weights pruned earlier (cost
:data:`~curvature.pruning.obs.FIXED_SCORE`, taken first).
"""

from __future__ import annotations

import torch

from curvature import kernels
from curvature.pruning import obs
from curvature.pruning.curvatures import CurvatureBlocks
from curvature.pruning.masks import MaskStructure
from curvature.pruning.targets import Target


def mark(scores, valid, fixed, g):
    """Scores with already-pruned groups first and padding groups never."""
    n = scores.shape[0]
    vg = valid.view(n, -1, g).all(-1)
    fg = fixed.view(n, -1, g).all(-1)
    scores = torch.where(fg, torch.full_like(scores, obs.FIXED_SCORE), scores)
    return scores.masked_fill(~vg, float("inf"))


def nm_order(scores, nm):
    """Independent N:M: in every run of M, the M - N lowest scores, in ascending order."""
    n_, m_ = nm
    n, b = scores.shape
    runs = scores.view(n, b // m_, m_)
    c, o = torch.topk(runs, m_ - n_, dim=-1, largest=False, sorted=True)
    o = o + torch.arange(0, b, m_, device=scores.device)[None, :, None]
    return o.reshape(n, -1), c.reshape(n, -1)


def order_by_scores(scores, valid, fixed, structure: MaskStructure):
    """Order of independent group scores: ascending (or per N:M run)."""
    scores = mark(scores, valid, fixed, structure.group)
    if structure.nm:
        return nm_order(scores, structure.nm)
    c, o = torch.sort(scores, dim=1, stable=True)
    return torch.where(torch.isfinite(c), o, torch.full_like(o, -1)), c


class Solver:
    """Chooses groups to prune and corrects the kept weights."""

    name = "solver"
    #: whether the solver reads inverse-curvature blocks (else only the diagonal, if any)
    needs_inverse = False

    def order(self, t: Target, w, curvature: CurvatureBlocks, structure, fixed):
        orders, costs = [], []
        valid = t.valid()
        for sl in t.chunks():
            o, c = self.order_chunk(w[sl], curvature, sl, valid[sl], fixed[sl], structure)
            orders.append(o)
            costs.append(c)
        return torch.cat(orders), torch.cat(costs)

    def order_chunk(self, w, curvature, sl, valid, fixed, structure):  # pragma: no cover
        raise NotImplementedError

    def update(self, t: Target, w, curvature: CurvatureBlocks, pruned, structure):
        new = torch.empty_like(w)
        for sl in t.chunks():
            new[sl] = self.update_chunk(w[sl], curvature, sl, pruned[sl], structure)
        return new

    def update_chunk(self, w, curvature, sl, pruned, structure):  # pragma: no cover
        raise NotImplementedError


class ScoreOnly(Solver):
    """Score each group by ``sum w^2 * diag`` (the identity: ``sum w^2``), prune, no correction.

    With the identity curvature this is magnitude pruning; with a layer-input diagonal it is the
    activation-aware score.
    """

    name = "score"

    def order_chunk(self, w, curvature, sl, valid, fixed, structure):
        d = curvature.diagonal(sl)
        sq = w * w if d is None else w * w * d
        g = structure.group
        scores = sq.view(-1, w.shape[1] // g, g).sum(-1)
        return order_by_scores(scores, valid, fixed, structure)

    def update_chunk(self, w, curvature, sl, pruned, structure):
        return torch.where(pruned, torch.zeros_like(w), w)


class IndependentOBS(Solver):
    """oBERT: score every group once by OBS, prune the cheapest together, sum the corrections."""

    name = "independent"
    needs_inverse = True

    def order_chunk(self, w, curvature, sl, valid, fixed, structure):
        hinv = curvature.inverse(sl)
        if structure.nm and structure.group == 1 and bool(valid.all()) and not bool(fixed.any()):
            # the fused N:M selection (scores and the per-run choice in one pass); its chosen
            # weights, ordered by score inside each run
            scores, chosen = kernels.obs_scores(w, hinv, 1, structure.nm)
            return nm_order(scores.masked_fill(~chosen, float("inf")), structure.nm)
        scores = obs.independent_scores(w, hinv, structure.group)
        return order_by_scores(scores, valid, fixed, structure)

    def update_chunk(self, w, curvature, sl, pruned, structure):
        return obs.independent_update(w, curvature.inverse(sl), pruned, structure.group)


class GreedyOBS(Solver):
    """Exact one-at-a-time OBS inside each block (inverse downdates after every group), the
    final weights by the exact joint correction of the chosen set."""

    name = "greedy"
    needs_inverse = True

    def order_chunk(self, w, curvature, sl, valid, fixed, structure):
        return obs.greedy_order(
            w, curvature.inverse(sl), valid, structure.group, fixed=fixed, nm=structure.nm
        )

    def update_chunk(self, w, curvature, sl, pruned, structure):
        return obs.masked_update(w, curvature.inverse(sl), pruned)


class LayerSolver:
    """A layer-wise solver: prunes one linear layer ``W`` (``[rows, cols]``, float64) from its
    input statistics (``H`` ``[cols, cols]``, or its diagonal) to a sparsity, choosing the mask
    and the new weights together. Run by :mod:`curvature.pruning.layerwise`."""

    name = "layer-solver"
    needs_inverse = False

    def prune_layer(self, w, stats, sparsity, structure, fixed, *, ratio, name, row_weights=None):
        """``(new weights, mask, estimate)``; ``row_weights`` (``[rows]`` or ``None``) weight each
        output row's error (:mod:`curvature.pruning.fisher_objective`)."""
        raise NotImplementedError  # pragma: no cover - interface


class SparseGPT(LayerSolver):
    """The SparseGPT column sweep (:func:`curvature.pruning.layer_obs.sparsegpt`)."""

    name = "sparsegpt"
    needs_inverse = True

    def __init__(self, block: int = 128, dtype: torch.dtype = torch.float64):
        self.block = block
        self.dtype = dtype

    def prune_layer(self, w, stats, sparsity, structure, fixed, *, ratio, name, row_weights=None):
        from curvature.pruning import layer_obs

        return layer_obs.sparsegpt(
            w,
            stats,
            sparsity,
            nm=structure.nm,
            fixed=fixed,
            ratio=ratio,
            block=self.block,
            name=name,
            row_weights=row_weights,
            dtype=self.dtype,
        )


class OBC(LayerSolver):
    """Exact greedy OBS per row on ``H^-1`` (:func:`curvature.pruning.layer_obs.obc`)."""

    name = "obc"
    needs_inverse = True

    def prune_layer(self, w, stats, sparsity, structure, fixed, *, ratio, name, row_weights=None):
        from curvature.pruning import layer_obs

        return layer_obs.obc(
            w,
            stats,
            sparsity,
            nm=structure.nm,
            group=structure.group,
            fixed=fixed,
            ratio=ratio,
            name=name,
            row_weights=row_weights,
        )


class Wanda(LayerSolver):
    """``|W_ij| * ||X_j||`` within each row, no update (:func:`.layer_obs.wanda`)."""

    name = "wanda"

    def prune_layer(self, w, stats, sparsity, structure, fixed, *, ratio, name, row_weights=None):
        from curvature.pruning import layer_obs

        # a per-row choice: row weights do not change it
        return layer_obs.wanda(w, stats, sparsity, nm=structure.nm, fixed=fixed)


class KeepMask(LayerSolver):
    """The mask another method chose, unchanged (the weights are then re-solved by
    :mod:`curvature.pruning.reconstruct`): the reconstruction pass after a non-layer-wise
    method."""

    name = "keep-mask"

    def prune_layer(self, w, stats, sparsity, structure, fixed, *, ratio, name, row_weights=None):
        if fixed is None:
            raise ValueError(f"{name}: reconstruct needs the layer's mask; it has none")
        return torch.where(fixed, torch.zeros_like(w), w), fixed.clone(), 0.0
