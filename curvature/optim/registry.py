"""The optimizers by name: one row each, with everything the callers need to know about it.

A row (:class:`Optimizer`) holds the class (or a lazy import of it), whether it takes the
parameters or the model, the keywords its name fixes (``mkor-h`` is MKOR with ``hybrid=True``),
the fine-tuning defaults (learning rate and keywords, from a short probe on a small BERT at batch
16, ``docs/bench-optim.md``), whether a step may need the backward with ``create_graph=True``,
and whether the model may be wrapped in ``DistributedDataParallel`` for it. Keywords are checked
against the constructor's signature and type annotations before any model exists
(:meth:`Optimizer.check`), so an optimizer is built once, by :meth:`Optimizer.build`.

A new optimizer is one :func:`register` call.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError

from curvature.core.registry import Registry

#: parameters every constructor takes positionally (not settable by keyword)
POSITIONAL = ("self", "params", "model", "lr")


def _never(optimizer) -> bool:
    return False


@dataclass(frozen=True)
class Optimizer:
    """One registered optimizer."""

    name: str
    load: Callable[[], type | None]  # the class; None when an optional package is missing
    lr: float  # fine-tuning default learning rate
    defaults: dict = field(default_factory=dict)  # fine-tuning default keywords
    takes_model: bool = False  # the constructor takes the model (it hooks modules), not params
    fixed: dict = field(default_factory=dict)  # keywords the name sets and the user may not
    # True at the steps whose backward must keep its graph (the step differentiates the gradient)
    needs_create_graph: Callable[[torch.optim.Optimizer], bool] = _never
    data_parallel: bool = True  # False: DistributedDataParallel cannot run its backward
    missing: str = ""  # how to install the class when ``load`` returns None
    #: its state is per element of each parameter (moments shaped like it), so it can keep
    #: training parameters whose rows and columns are removed mid-training
    elementwise: bool = False
    description: str = ""

    @property
    def differentiates_gradient(self) -> bool:
        """Whether some of its steps need the backward with ``create_graph=True`` (then gradient
        clipping in place, which would corrupt the gradient's graph, must be off)."""
        return self.needs_create_graph is not _never

    def cls(self) -> type:
        found = self.load()
        if found is None:
            raise ValueError(f"optimizer {self.name} needs {self.missing}")
        return found

    def keywords(self) -> dict[str, object]:
        """Keyword name -> type annotation (None where the class has none)."""
        cls = self.cls()
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # torch's own optimizers: names only
            hints = {}
        return {
            p: hints.get(p)
            for p, spec in inspect.signature(cls.__init__).parameters.items()
            if p not in POSITIONAL
            and p not in self.fixed
            and spec.kind not in (spec.VAR_KEYWORD, spec.VAR_POSITIONAL)
        }

    def check(self, kwargs: dict) -> dict:
        """The keywords, checked by name (nearest valid name on a typo) and coerced to their
        annotated types (``exclude=classifier`` from a command line is a string, not a list)."""
        allowed = self.keywords()
        out = {}
        for key, value in kwargs.items():
            if key in self.fixed:
                if value != self.fixed[key]:
                    raise ValueError(self._fixed_error(key, value))
                continue  # the value the name already sets
            if key not in allowed:
                near = difflib.get_close_matches(str(key), list(allowed), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(
                    f"optimizer {self.name}: unexpected keyword {key!r}{hint}; "
                    f"valid: {', '.join(allowed)}"
                )
            hint = allowed[key]
            if hint is None:
                out[key] = value
                continue
            try:
                adapter = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
                out[key] = adapter.validate_python(value)
            except ValidationError:
                shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
                raise ValueError(
                    f"optimizer {self.name}: {key} must be {shown}, got {value!r}"
                    + (" (a list is written [a, b])" if isinstance(value, str) else "")
                ) from None
        return out

    def _fixed_error(self, key: str, value) -> str:
        same = [n for n in OPTIMIZERS if OPTIMIZERS.get(n).fixed.get(key, object()) == value]
        hint = f"; optimizer {same[0]} is {key}={value!r}" if same else ""
        return f"optimizer {self.name} is {key}={self.fixed[key]!r}{hint}"

    def build(self, model: torch.nn.Module, *, lr: float, **kwargs) -> torch.optim.Optimizer:
        """The optimizer for ``model``'s trainable parameters (or the model itself)."""
        kwargs = self.check(kwargs)
        target = model if self.takes_model else [p for p in model.parameters() if p.requires_grad]
        try:
            return self.cls()(target, lr=lr, **self.fixed, **kwargs)
        except TypeError as exc:
            raise ValueError(f"optimizer {self.name}: {exc}") from None


OPTIMIZERS = Registry("optimizer")


def register(name: str, load: Callable[[], type | None], *, lr: float, **settings) -> Optimizer:
    """Add an optimizer: ``register("mine", lambda: Mine, lr=1e-3, defaults={...})``."""
    entry = Optimizer(name, load, lr, **settings)
    OPTIMIZERS.add(name, entry)
    return entry


def get(name: str) -> Optimizer:
    """The row of ``name`` (case does not matter); an unknown name names the nearest."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        near = difflib.get_close_matches(key, OPTIMIZERS.names(), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(
            f"optimizer must be one of {', '.join(OPTIMIZERS.names())}, got {name!r}{hint}"
        )
    return OPTIMIZERS.get(key)


def describe_defaults() -> str:
    """One line per optimizer: its default learning rate and keywords."""
    return "; ".join(
        f"{o.name} lr {o.lr:g}" + "".join(f", {k}={v}" for k, v in o.defaults.items())
        for o in (OPTIMIZERS.get(n) for n in OPTIMIZERS)
    )


def _soap():
    try:
        from pytorch_optimizer import SOAP
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    return SOAP


def _refreshes(optimizer) -> bool:
    return bool(optimizer.refreshes_next_step)


# the classes are imported here, after the registry exists, so that each module stays standalone
from curvature.optim.adahessian import AdaHessian  # noqa: E402
from curvature.optim.hybrid import MuonAdamW  # noqa: E402
from curvature.optim.lamb import LAMB  # noqa: E402
from curvature.optim.mfac import MFAC  # noqa: E402
from curvature.optim.mkor import MKOR  # noqa: E402

_MKOR_DEFAULTS = {"base_optimizer": "adamw", "weight_decay": 0.01, "exclude": ["classifier"]}
register(
    "adamw",
    lambda: torch.optim.AdamW,
    elementwise=True,
    lr=1e-4,
    defaults={"weight_decay": 0.01},
    description="torch.optim.AdamW, the first-order baseline",
)
register(
    "sgd",
    lambda: torch.optim.SGD,
    lr=1e-2,
    defaults={"momentum": 0.9},
    elementwise=True,
    description="SGD",
)
register(
    "adahessian",
    lambda: AdaHessian,
    elementwise=True,
    lr=1e-2,
    defaults={"weight_decay": 0.01},
    needs_create_graph=_refreshes,
    data_parallel=False,
    description="Hutchinson Hessian diagonal in an Adam-style update",
)
register(
    "mfac",
    lambda: MFAC,
    lr=3e-2,
    defaults={"gradients": 16, "damping": 1e-4},
    description="sliding-window empirical-Fisher inverse, matrix-free",
)
register(
    "mkor",
    lambda: MKOR,
    lr=1e-4,
    defaults=_MKOR_DEFAULTS,
    takes_model=True,
    fixed={"hybrid": False},
    description="Kronecker factors kept by rank-1 Sherman-Morrison updates",
)
register(
    "mkor-h",
    lambda: MKOR,
    lr=1e-4,
    defaults=_MKOR_DEFAULTS,
    takes_model=True,
    fixed={"hybrid": True},
    description="MKOR that switches to its base optimizer when the loss stalls",
)
register(
    "lamb",
    lambda: LAMB,
    elementwise=True,
    lr=1e-3,
    defaults={"weight_decay": 0.01},
    description="layer-wise trust-ratio Adam",
)
register(
    "muon",
    lambda: MuonAdamW,
    lr=1e-4,
    defaults={"weight_decay": 0.01},
    takes_model=True,
    description="Muon on hidden linear weights, AdamW on the rest",
)
register(
    "soap",
    _soap,
    lr=1e-4,
    defaults={"weight_decay": 0.01},
    missing="the pytorch-optimizer package: pip install pytorch-optimizer",
    description="SOAP (Adam in the Shampoo eigenbasis)",
)
