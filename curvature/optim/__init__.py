"""Second-order optimizers as drop-in ``torch.optim`` optimizers.

- :class:`AdaHessian` — Hutchinson Hessian diagonal in an Adam-style update.
- :class:`MFAC` — sliding-window damped empirical-Fisher inverse (matrix-free).
- :class:`MKOR` — Kronecker factors kept by rank-1 Sherman-Morrison updates; MKOR-H switches to
  its first-order base optimizer automatically.
- :class:`LAMB` — layer-wise trust-ratio Adam, a base optimizer for MKOR.

:func:`build_optimizer` is the single place where an optimizer is made from a name (used by the
recipes' ``OptimizerModifier``, the ``Trainer`` integration and the CLI).
"""

from curvature.optim.adahessian import AdaHessian
from curvature.optim.lamb import LAMB
from curvature.optim.mfac import MFAC
from curvature.optim.mkor import MKOR

OPTIMIZERS = ("adamw", "sgd", "adahessian", "mfac", "mkor", "mkor-h", "lamb")


def build_optimizer(name: str, model, *, lr: float, **kwargs):
    """Make an optimizer by name for ``model``; unknown names and keywords raise ``ValueError``."""
    import torch

    name = name.lower()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, **kwargs)
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, **kwargs)
        if name == "lamb":
            return LAMB(params, lr=lr, **kwargs)
        if name == "adahessian":
            return AdaHessian(params, lr=lr, **kwargs)
        if name == "mfac":
            return MFAC(params, lr=lr, **kwargs)
        if name in ("mkor", "mkor-h"):
            return MKOR(
                model, lr=lr, hybrid=name == "mkor-h" or kwargs.pop("hybrid", False), **kwargs
            )
    except TypeError as exc:
        raise ValueError(f"optimizer {name}: {exc}") from None
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def needs_create_graph(optimizer) -> bool:
    """True for optimizers that differentiate the gradient (backward with create_graph=True)."""
    return isinstance(optimizer, AdaHessian)


__all__ = [
    "LAMB",
    "MFAC",
    "MKOR",
    "OPTIMIZERS",
    "AdaHessian",
    "build_optimizer",
    "needs_create_graph",
]
