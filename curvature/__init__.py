"""curvature-toolkit: second-order pruning and optimization for PyTorch and Hugging Face models.

The top level exports the curvature core only (pure PyTorch, no model or Hugging Face knowledge).
The layers, lowest first (``docs/architecture.md``): :mod:`curvature.kernels`,
:mod:`curvature.core`, the engines :mod:`curvature.pruning` and :mod:`curvature.optim`, then
:mod:`curvature.tasks`, :mod:`curvature.recipes`, :mod:`curvature.integrations`, and last the
command line :mod:`curvature.cli`.
"""

from curvature.core import (
    FisherInverse,
    KroneckerFactorInverse,
    SlidingWindowFisherInverse,
    hessian_vector_product,
    hutchinson_diagonal,
    hutchinson_trace,
)

__version__ = "0.1.0"

__all__ = [
    "FisherInverse",
    "KroneckerFactorInverse",
    "SlidingWindowFisherInverse",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "hutchinson_trace",
]
