"""Second-order pruning: Optimal Brain Surgeon on block-diagonal Fisher inverses, and baselines.

Public entry point: :func:`prune` (one-shot, any ``torch.nn.Module``). Gradual pruning during
training is driven by recipes (:mod:`curvature.recipes`), which call the same engine.
"""

from curvature.pruning.engine import PruneReport, collect_fisher, prune
from curvature.pruning.masks import MaskSet, parse_mask
from curvature.pruning.params import select_params
from curvature.pruning.schedule import interpolate, sparsity_at

__all__ = [
    "MaskSet",
    "PruneReport",
    "collect_fisher",
    "interpolate",
    "parse_mask",
    "prune",
    "select_params",
    "sparsity_at",
]
