"""Second-order pruning: Optimal Brain Surgeon on block-diagonal Fisher inverses, and baselines.

Public entry point: :func:`prune` (one-shot, any ``torch.nn.Module``). A method is a pipeline of
parts (:mod:`curvature.pruning.parts`, composed by :func:`chain`), or the name of a registered
preset (:data:`METHODS`), with added parts by ``+`` (:data:`PARTS`). Gradual pruning during
training is driven by recipes (:mod:`curvature.recipes`), which call the same engine.
"""

from curvature.pruning import parts
from curvature.pruning.engine import PruneReport, collect_fisher, prune, run
from curvature.pruning.masks import MaskSet, parse_mask
from curvature.pruning.params import select_params
from curvature.pruning.parts import chain
from curvature.pruning.registry import METHODS, PARTS, pipeline, register, register_part
from curvature.pruning.schedule import interpolate, sparsity_at
from curvature.pruning.settings import PruneSettings

__all__ = [
    "METHODS",
    "PARTS",
    "MaskSet",
    "PruneReport",
    "PruneSettings",
    "chain",
    "collect_fisher",
    "interpolate",
    "parse_mask",
    "parts",
    "pipeline",
    "prune",
    "register",
    "register_part",
    "run",
    "select_params",
    "sparsity_at",
]
