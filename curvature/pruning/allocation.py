"""Allocation parts: how many groups of each block to prune, given every block's ordered costs.

An :class:`Allocation` turns the solvers' per-block costs into per-block counts (a prefix of each
block's order is pruned). Costs are first made non-decreasing along each block (running max), so
that taking the cheapest steps always takes a prefix of every block's order.

- :class:`GlobalThreshold`: one threshold over every target (the cheapest groups anywhere);
- :class:`LayerTargets`: a target per parameter, uniform by default, or any mapping of parameter
  names to sparsities (non-uniform allocations, such as outlier-weighted ones, supply that map).

N:M masks need no allocation: the structure fixes the count of every run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from curvature.pruning import obs
from curvature.pruning.targets import Target


def monotone(costs: torch.Tensor) -> torch.Tensor:
    # a NaN cost (a degenerate block) is never chosen: as +inf it cannot poison the threshold
    costs = torch.nan_to_num(costs, nan=float("inf"))
    return torch.cummax(costs.clamp_min(obs.FIXED_SCORE), dim=1).values


def take_cheapest(costs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Counts per block: the ``k`` cheapest steps across all blocks of all ``costs``.

    One selection over all costs: the ``k``-th smallest value is the threshold; every block takes
    its steps below it, and the steps equal to it are taken in the order the blocks are listed
    (first cost tensor first, row by row) until ``k`` are taken, which is the choice a stable sort
    of all costs would make. Linear in the number of costs, not in ``k`` times the targets.
    """
    flat = [monotone(c).cpu() for c in costs]
    total = sum(f.numel() for f in flat)
    k = max(0, min(int(k), total))
    devices = [c.device for c in costs]
    if k == 0:
        return [torch.zeros(f.shape[0], dtype=torch.long, device=d) for f, d in zip(flat, devices)]
    allv = torch.cat([f.flatten() for f in flat])
    threshold = torch.kthvalue(allv, k).values
    need = k - sum(int((f < threshold).sum()) for f in flat)
    return [c.to(d) for c, d in zip(take_at_threshold(flat, threshold, need), devices)]


def take_at_threshold(costs: list[torch.Tensor], threshold, need: int) -> list[torch.Tensor]:
    """Counts per block: every step below ``threshold``, and of the steps equal to it the first
    ``need`` in listing order (first tensor first, row by row). Shared by the one-process
    selection and the distributed one (which passes each rank its share of ``need``)."""
    if not costs:  # a rank holding no block of the pool
        return []
    below = [(c < threshold).sum(1) for c in costs]
    ties = [(c == threshold).sum(1) for c in costs]
    tie_all = torch.cat(ties)
    before = torch.cumsum(tie_all, 0) - tie_all  # ties in earlier blocks, in listing order
    take_all = (need - before).clamp(min=0).minimum(tie_all)
    counts, start = [], 0
    for b, t in zip(below, ties):
        counts.append(b + take_all[start : start + t.numel()])
        start += t.numel()
    return counts


def take_cheapest_by_sorting(costs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """:func:`take_cheapest` as one stable sort of every cost: the reference it must equal
    (``tests/project/test_trust.py``) and the method it replaced (``scripts/bench_pruning.py``);
    ``O(n log n)`` in the number of costs. CPU tensors."""
    flat = [monotone(c) for c in costs]
    allv = torch.cat([f.flatten() for f in flat])
    owner = torch.cat([torch.full((f.numel(),), i, dtype=torch.long) for i, f in enumerate(flat)])
    order = torch.argsort(allv, stable=True)[:k]
    out, offset = [], 0
    for i, f in enumerate(flat):
        picked = order[owner[order] == i]
        out.append(torch.bincount((picked - offset) // f.shape[1], minlength=f.shape[0]))
        offset += f.numel()
    return out


class Allocation:
    name = "allocation"

    def counts(
        self, targets: list[Target], costs: dict[str, torch.Tensor], sparsity: float, group: int
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - interface

    def pools(self, targets: list[Target], pieces: list, sparsity: float, group: int):
        """For a selection across processes: ``(pools, ks)``, this rank's ``pieces`` (of the
        parameters ``targets``) grouped into pools that each take their ``ks[i]`` cheapest
        steps, in the order :meth:`counts` lists them."""
        raise NotImplementedError  # pragma: no cover - interface


class GlobalThreshold(Allocation):
    """One threshold across all targets: ``round(sparsity * total / g)`` cheapest groups."""

    name = "global"

    def counts(self, targets, costs, sparsity, group):
        k = round(sparsity * sum(t.numel for t in targets) / group)
        alloc = take_cheapest([costs[t.name] for t in targets], k)
        return {t.name: c for t, c in zip(targets, alloc)}

    def pools(self, targets, pieces, sparsity, group):
        return [list(pieces)], [round(sparsity * sum(t.numel for t in targets) / group)]


class LayerTargets(Allocation):
    """A sparsity per target: ``sparsities[name]``, or the step's target for names not given."""

    name = "per-layer"

    def __init__(self, sparsities: Mapping[str, float] | None = None):
        self.sparsities = dict(sparsities or {})

    def counts(self, targets, costs, sparsity, group):
        return {
            t.name: take_cheapest(
                [costs[t.name]], round(self.sparsities.get(t.name, sparsity) * t.numel / group)
            )[0]
            for t in targets
        }

    def pools(self, targets, pieces, sparsity, group):
        pools = [[p for p in pieces if p.name == t.name] for t in targets]
        ks = [round(self.sparsities.get(t.name, sparsity) * t.numel / group) for t in targets]
        return pools, ks


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """The share of a group's scores above ``m`` times their mean (all the group's layers'
    scores together): the layerwise outlier distribution of outlier-weighted sparsity."""
    flat = torch.cat([s.flatten().to(torch.float64) for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def outlier_targets(
    ratios: list[float], sizes: list[int], sparsity: float, lam: float
) -> list[float]:
    """Per-group sparsities from outlier ratios: more outliers, fewer weights pruned.

    The ratios are mapped linearly onto ``[0, 2 lam]`` (the group with the fewest outliers at 0,
    the most at ``2 lam``); group ``b`` gets ``clip(sparsity + c - v_b, sparsity - lam,
    sparsity + lam)`` (and inside ``[0, 1)``), with ``c`` found by bisection so that the
    targets' average weighted by the groups' sizes is ``sparsity``: the model's sparsity is the
    target. Equal ratios (or ``lam = 0``) give every group the target. The published rule shifts
    by the unweighted mean of ``v`` and does not clip, which can leave ``[sparsity - lam,
    sparsity + lam]`` when the ratios are skewed and misses the target when groups differ in
    size; here both hold.
    """
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("outlier_targets: one ratio and one size per group")
    if not 0 <= lam < 1:
        raise ValueError(f"outlier_lambda must be in [0, 1), got {lam!r}")
    r = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    span = float(r.max() - r.min())
    if lam == 0 or span == 0:
        return [float(sparsity)] * len(ratios)
    v = (r - r.min()) / span * (2 * lam)
    lo = max(sparsity - lam, 0.0)
    hi = min(sparsity + lam, 1.0 - 1e-9)

    def targets(c: float) -> torch.Tensor:
        return (sparsity + c - v).clamp(lo, hi)

    def mean(c: float) -> float:
        return float((targets(c) * n).sum() / n.sum())

    a, b = -3.0, 3.0  # mean(a) = lo <= sparsity <= hi = mean(b)
    for _ in range(200):
        mid = (a + b) / 2
        if mean(mid) < sparsity:
            a = mid
        else:
            b = mid
    out = targets((a + b) / 2)
    # the last rounding: spread the remaining difference over the groups strictly inside the bounds
    diff = sparsity - float((out * n).sum() / n.sum())
    inside = (out > lo) & (out < hi)
    if diff and bool(inside.any()):
        out[inside] += diff * float(n.sum()) / float(n[inside].sum())
    return [float(x) for x in out]
