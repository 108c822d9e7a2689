"""The curvature core: estimators of the loss's second-order structure, in pure PyTorch.

- :class:`FisherInverse`: block-diagonal empirical-Fisher inverses (Woodbury or M-FAC form);
- :class:`SlidingWindowFisherInverse`: the same over the last ``m`` gradients;
- :func:`hessian_vector_product`, :func:`hutchinson_diagonal`, :func:`hutchinson_trace`;
- :class:`KroneckerFactorInverse`: rank-1 updated inverses of Kronecker factors;
- :mod:`curvature.core.checks`: the argument checks every layer uses.

Nothing here knows about models, recipes, tasks or Hugging Face. All arithmetic runs in float64
(see each module's precision note); storage dtypes are the caller's choice.
"""

from curvature.core.fisher import FisherInverse
from curvature.core.hessian import hessian_vector_product, hutchinson_diagonal, hutchinson_trace
from curvature.core.kronecker import KroneckerFactorInverse
from curvature.core.sliding import SlidingWindowFisherInverse

__all__ = [
    "FisherInverse",
    "KroneckerFactorInverse",
    "SlidingWindowFisherInverse",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "hutchinson_trace",
]
