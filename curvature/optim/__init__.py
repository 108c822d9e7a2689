"""Second-order optimizers as drop-in ``torch.optim`` optimizers.

- :class:`AdaHessian` — Hutchinson Hessian diagonal in an Adam-style update.
- :class:`MFAC` — sliding-window damped empirical-Fisher inverse (matrix-free).
- :class:`MKOR` — Kronecker factors kept by rank-1 Sherman-Morrison updates; MKOR-H switches to
  its first-order base optimizer automatically.
- :class:`LAMB` — layer-wise trust-ratio Adam, a base optimizer for MKOR.
- :class:`MuonAdamW` — ``torch.optim.Muon`` on the hidden linear weights, AdamW on the rest;
  ``"soap"`` is the SOAP optimizer of the maintained ``pytorch-optimizer`` package. Both are here
  as the first-order-plus choices users compare the second-order ones against.

:func:`build_optimizer` is the single place where an optimizer is made from a name (used by the
recipes' ``OptimizerModifier``, the ``Trainer`` integration and the CLI).
"""

import difflib
import inspect
import typing

from pydantic import ConfigDict, TypeAdapter, ValidationError

from curvature.core import checks
from curvature.optim.adahessian import AdaHessian
from curvature.optim.hybrid import Combined, MuonAdamW
from curvature.optim.lamb import LAMB
from curvature.optim.mfac import MFAC
from curvature.optim.mkor import MKOR

OPTIMIZERS = ("adamw", "sgd", "adahessian", "mfac", "mkor", "mkor-h", "lamb", "muon", "soap")


def _optimizer_class(name: str):
    import torch

    return {
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "lamb": LAMB,
        "adahessian": AdaHessian,
        "mfac": MFAC,
        "mkor": MKOR,
        "mkor-h": MKOR,
        "muon": MuonAdamW,
        "soap": _soap_class(),
    }[name]


def _soap_class():
    try:
        from pytorch_optimizer import SOAP
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    return SOAP


def check_optimizer(name: str, kwargs: dict) -> dict:
    """Check an optimizer name and keywords against its signature, before any model exists.

    Unknown names and keywords are refused with the nearest valid one; values are validated
    against the constructor's type annotations (``exclude=classifier`` is a string, not the list
    ``exclude`` takes). Returns the keywords, coerced to the annotated types.
    """
    key_name = checks.one_of("optimizer", str(name).lower(), OPTIMIZERS)
    cls = _optimizer_class(key_name)
    if cls is None:
        raise ValueError(
            "optimizer soap needs the pytorch-optimizer package: pip install pytorch-optimizer"
        )
    fixed = ("self", "params", "model", "lr") + (("hybrid",) if key_name == "mkor-h" else ())
    allowed = [
        p
        for p, spec in inspect.signature(cls.__init__).parameters.items()
        if p not in fixed and spec.kind not in (spec.VAR_KEYWORD, spec.VAR_POSITIONAL)
    ]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # torch's own optimizers: names only
        hints = {}
    out = {}
    for key, value in kwargs.items():
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(
                f"optimizer {name}: unexpected keyword {key!r}{hint}; valid: {', '.join(allowed)}"
            )
        hint = hints.get(key)
        if hint is None:
            out[key] = value
            continue
        try:
            adapter = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
            out[key] = adapter.validate_python(value)
        except ValidationError:
            shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise ValueError(
                f"optimizer {name}: {key} must be {shown}, got {value!r}"
                + (" (a list is written [a, b])" if isinstance(value, str) else "")
            ) from None
    return out


def build_optimizer(name: str, model, *, lr: float, **kwargs):
    """Make an optimizer by name for ``model``; unknown names and keywords raise ``ValueError``."""
    import torch

    name = name.lower()
    if name in OPTIMIZERS:
        kwargs = check_optimizer(name, kwargs)
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
        if name == "muon":
            return MuonAdamW(model, lr=lr, **kwargs)
        if name == "soap":
            return _optimizer_class("soap")(params, lr=lr, **kwargs)
        if name in ("mkor", "mkor-h"):
            return MKOR(
                model, lr=lr, hybrid=name == "mkor-h" or kwargs.pop("hybrid", False), **kwargs
            )
    except TypeError as exc:
        raise ValueError(f"optimizer {name}: {exc}") from None
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def needs_create_graph(optimizer) -> bool:
    """True when the optimizer's next step differentiates the gradient, so the backward before it
    needs ``create_graph=True``: AdaHessian at the steps that refresh its Hessian estimate (every
    ``update_each``-th)."""
    return isinstance(optimizer, AdaHessian) and optimizer.refreshes_next_step


__all__ = [
    "LAMB",
    "MFAC",
    "MKOR",
    "OPTIMIZERS",
    "AdaHessian",
    "Combined",
    "MuonAdamW",
    "build_optimizer",
    "check_optimizer",
    "needs_create_graph",
]
