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


def _monotone(costs: torch.Tensor) -> torch.Tensor:
    return torch.cummax(costs.clamp_min(obs.FIXED_SCORE), dim=1).values


def take_cheapest(costs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Counts per block: the ``k`` cheapest steps across all blocks of all ``costs``."""
    flat = [_monotone(c) for c in costs]
    allv = torch.cat([f.flatten() for f in flat])
    owner = torch.cat([torch.full((f.numel(),), i, dtype=torch.long) for i, f in enumerate(flat)])
    order = torch.argsort(allv.cpu(), stable=True)[:k]
    counts = []
    for i, f in enumerate(flat):
        picked = order[owner[order] == i]
        offset = sum(x.numel() for x in flat[:i])
        block_ids = (picked - offset) // f.shape[1]
        counts.append(torch.bincount(block_ids, minlength=f.shape[0]).to(f.device))
    return counts


class Allocation:
    name = "allocation"

    def counts(
        self, targets: list[Target], costs: dict[str, torch.Tensor], sparsity: float, group: int
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class GlobalThreshold(Allocation):
    """One threshold across all targets: ``round(sparsity * total / g)`` cheapest groups."""

    name = "global"

    def counts(self, targets, costs, sparsity, group):
        k = round(sparsity * sum(t.numel for t in targets) / group)
        alloc = take_cheapest([costs[t.name] for t in targets], k)
        return {t.name: c for t, c in zip(targets, alloc)}


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
