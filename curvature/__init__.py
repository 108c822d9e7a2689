"""curvature-toolkit: second-order pruning and optimization for PyTorch and Hugging Face models.

The top level exports the curvature core only (pure PyTorch, no model or Hugging Face knowledge).
Pruning lives in :mod:`curvature.pruning`, recipes in :mod:`curvature.recipes`, data and model
loading in :mod:`curvature.data` and :mod:`curvature.models`.
"""

from curvature.fisher import FisherInverse
from curvature.hessian import hessian_vector_product, hutchinson_diagonal, hutchinson_trace
from curvature.kronecker import KroneckerFactorInverse
from curvature.sliding import SlidingWindowFisherInverse

__version__ = "0.1.0"

__all__ = [
    "FisherInverse",
    "KroneckerFactorInverse",
    "SlidingWindowFisherInverse",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "hutchinson_trace",
]
