"""Second-order pruning: Optimal Brain Surgeon on block-diagonal Fisher inverses, and baselines.

Public entry point: :func:`prune` (one-shot, any ``torch.nn.Module``). A method is a registered
preset of parts (:data:`METHODS`: curvature, solver; the call adds mask structure and allocation).
Gradual pruning during training is driven by recipes (:mod:`curvature.recipes`), which call the
same engine.
"""

from curvature.pruning.engine import PruneReport, collect_fisher, prune, run
from curvature.pruning.masks import MaskSet, parse_mask
from curvature.pruning.params import select_params
from curvature.pruning.registry import METHODS, register
from curvature.pruning.schedule import interpolate, sparsity_at
from curvature.pruning.settings import PruneSettings

__all__ = [
    "METHODS",
    "MaskSet",
    "PruneReport",
    "PruneSettings",
    "collect_fisher",
    "interpolate",
    "parse_mask",
    "prune",
    "register",
    "run",
    "select_params",
    "sparsity_at",
]
