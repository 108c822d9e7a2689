"""Second-order optimizers as drop-in ``torch.optim`` optimizers.

- :class:`AdaHessian` — Hutchinson Hessian diagonal in an Adam-style update.
- :class:`MFAC` — sliding-window damped empirical-Fisher inverse (matrix-free).
- :class:`MKOR` — Kronecker factors kept by rank-1 Sherman-Morrison updates; MKOR-H switches to
  its first-order base optimizer automatically.
- :class:`LAMB` — layer-wise trust-ratio Adam, a base optimizer for MKOR.
- :class:`MuonAdamW` — ``torch.optim.Muon`` on the hidden linear weights, AdamW on the rest;
  ``"soap"`` is the SOAP optimizer of the maintained ``pytorch-optimizer`` package. Both are here
  as the first-order-plus choices users compare the second-order ones against.

Each optimizer is one row of :data:`OPTIMIZERS` (:mod:`curvature.optim.registry`): its class,
its fine-tuning defaults, whether its step needs ``create_graph``. :func:`build_optimizer` is the
single place where an optimizer is made from a name (used by the recipes' ``OptimizerModifier``,
the ``Trainer`` integration and the CLI).
"""

from curvature.optim.adahessian import AdaHessian
from curvature.optim.hybrid import Combined, MuonAdamW
from curvature.optim.lamb import LAMB
from curvature.optim.mfac import MFAC
from curvature.optim.mkor import MKOR
from curvature.optim.registry import OPTIMIZERS, Optimizer, get, register


def check_optimizer(name: str, kwargs: dict) -> dict:
    """Check an optimizer name and keywords against its constructor, before any model exists.

    Unknown names and keywords are refused with the nearest valid one; values are validated
    against the constructor's type annotations. Returns the keywords, coerced to those types.
    """
    return get(name).check(kwargs)


def build_optimizer(name: str, model, *, lr: float, **kwargs):
    """Make an optimizer by name for ``model``; unknown names and keywords raise ``ValueError``."""
    return get(name).build(model, lr=lr, **kwargs)


def needs_create_graph(optimizer) -> bool:
    """True when the optimizer's next step differentiates the gradient, so the backward before it
    needs ``create_graph=True`` (AdaHessian at the steps that refresh its Hessian estimate)."""
    for name in OPTIMIZERS:
        row = OPTIMIZERS.get(name)
        cls = row.load()
        if cls is not None and type(optimizer) is cls:
            return row.needs_create_graph(optimizer)
    return False


__all__ = [
    "LAMB",
    "MFAC",
    "MKOR",
    "OPTIMIZERS",
    "AdaHessian",
    "Combined",
    "MuonAdamW",
    "Optimizer",
    "build_optimizer",
    "check_optimizer",
    "get",
    "needs_create_graph",
    "register",
]
