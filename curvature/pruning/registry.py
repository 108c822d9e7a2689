"""The method registry: a pruning method is a named preset of parts.

A method is one row: a :mod:`curvature <curvature.pruning.curvatures>` part and a
:mod:`solver <curvature.pruning.solvers>` part (the mask structure and the allocation are chosen
per call by ``mask=`` and ``global_sparsity=``). ``prune()``, the recipe modifiers and
``curvature sweep --methods`` resolve names here, so a new method is one :func:`register` call.

A method may be named with parts added to it, ``base+part+part`` (:data:`PARTS`), such as
``sparsegpt+reconstruct+outlier+fisher``: the base method chooses the mask, ``reconstruct``
re-solves the kept weights of every linear layer for that mask
(:mod:`curvature.pruning.reconstruct`), ``outlier`` gives every block its own target from its
outlier activations (:func:`curvature.pruning.allocation.outlier_targets`), ``fisher`` weights
the layer objective by the gradient Fisher of the layer's outputs
(:mod:`curvature.pruning.fisher_objective`). Each is also a keyword of ``prune()``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, replace

from curvature.pruning.curvatures import Curvature, EmpiricalFisher, Identity, LayerHessian
from curvature.pruning.solvers import (
    OBC,
    GreedyOBS,
    IndependentOBS,
    ScoreOnly,
    Solver,
    SparseGPT,
    Wanda,
)

#: OBS solvers a ``selection=`` argument may choose for a method whose solver is selectable
SOLVERS: dict[str, Callable[[], Solver]] = {"greedy": GreedyOBS, "independent": IndependentOBS}
SOLVER_CHOICES = tuple(SOLVERS)


@dataclass(frozen=True)
class Method:
    """A registered method: how to make its parts."""

    name: str
    curvature: Callable[[], Curvature]
    solver: Callable[[], Solver]
    description: str
    #: whether ``selection=`` picks the solver among :data:`SOLVERS` (the OBS methods)
    selectable: bool = False
    #: parts added to the base method by a ``base+part`` name (:data:`PARTS`)
    added: tuple[str, ...] = ()

    @property
    def needs_gradients(self) -> bool:
        return self.curvature().needs_gradients

    @property
    def layerwise(self) -> bool:
        """Built layer by layer from calibration inputs (forward passes, no gradients)."""
        return self.curvature().layerwise

    @property
    def needs_data(self) -> bool:
        """Whether a pruning step reads data and a loss function (gradients or inputs)."""
        return self.needs_gradients or self.layerwise or bool(self.added)

    def parts(self, selection: str = "greedy") -> tuple[Curvature, Solver]:
        solver = SOLVERS[selection]() if self.selectable else self.solver()
        return self.curvature(), solver


#: parts a method name may add (``sparsegpt+reconstruct``), each a keyword of ``prune()``
PARTS = ("reconstruct", "outlier", "fisher")


def split_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"sparsegpt+reconstruct+fisher"`` -> ``("sparsegpt", ("reconstruct", "fisher"))``; an
    unknown or repeated part raises one line naming it and the nearest valid one."""
    base, *parts = str(spec).split("+")
    for p in parts:
        if p not in PARTS:
            near = difflib.get_close_matches(p, PARTS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(
                f"method {spec!r}: unknown part {p!r}{hint}; parts: {', '.join(PARTS)}"
            )
    if len(set(parts)) != len(parts):
        raise ValueError(f"method {spec!r}: a part is named twice")
    return base, tuple(parts)


class Registry:
    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def register(self, method: Method) -> Method:
        if method.name in self._methods:
            raise ValueError(f"a pruning method named {method.name!r} is already registered")
        self._methods[method.name] = method
        return method

    def names(self) -> tuple[str, ...]:
        return tuple(self._methods)

    def __contains__(self, name: str) -> bool:
        try:
            base, _ = split_spec(name)
        except ValueError:
            return False
        return base in self._methods

    def __getitem__(self, name: str) -> Method:
        if "+" in str(name):
            base, parts = split_spec(name)
            return replace(self[base], name=str(name), added=parts)
        try:
            return self._methods[name]
        except KeyError:
            near = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(
                f"unknown pruning method {name!r}{hint}; registered: {', '.join(self.names())}"
            ) from None

    def describe(self) -> str:
        return "\n".join(f"{m.name}: {m.description}" for m in self._methods.values())


METHODS = Registry()


def register(name, curvature, solver, description, *, selectable=False) -> Method:
    """Add a method (``curvature`` and ``solver`` are classes or factories of the parts)."""
    return METHODS.register(Method(name, curvature, solver, description, selectable))


register(
    "obs",
    EmpiricalFisher,
    GreedyOBS,
    "gradient-Fisher OBS; selection='greedy' (exact, default) or 'independent' (oBERT)",
    selectable=True,
)
register(
    "obs-independent",
    EmpiricalFisher,
    IndependentOBS,
    "gradient-Fisher OBS, oBERT's independent scores and summed corrections",
)
register(
    "mfac",
    lambda: EmpiricalFisher(algorithm="mfac"),
    GreedyOBS,
    "gradient-Fisher OBS with the Fisher inverse held in the M-FAC form",
    selectable=True,
)
register("magnitude", Identity, ScoreOnly, "weight magnitude, no curvature and no correction")
register(
    "sparsegpt",
    LayerHessian,
    SparseGPT,
    "layer-wise OBS on each linear layer's input Hessian: the column sweep with lazy updates",
)
register(
    "obc",
    LayerHessian,
    OBC,
    "layer-wise OBS, exact greedy per row on the input Hessian (Optimal Brain Compression)",
)
register(
    "wanda",
    lambda: LayerHessian(diagonal=True),
    Wanda,
    "|weight| x input norm compared within each output row, no correction",
)

#: the methods that prune one linear layer at a time from its calibration inputs
LAYERWISE = ("sparsegpt", "obc", "wanda")


def resolve(method: str, selection: str = "greedy") -> tuple[Curvature, Solver]:
    """The parts of ``method`` (``selection`` picks the OBS solver where the method allows)."""
    return METHODS[method].parts(selection)
