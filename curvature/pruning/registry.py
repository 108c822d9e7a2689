"""Named presets of parts: the pruning methods, and the parts a name may add with ``+``.

A method name is a preset: a factory of a :class:`~curvature.pruning.parts.Chooser`
(``"obs"`` is ``OBS()``, ``"mfac"`` is ``OBS(inverse="mfac")``, ``"sparsegpt"`` is
``SparseGPT()``). ``base+part+part`` adds registered parts to it
(``"sparsegpt+reconstruct+outlier+fisher"``). ``prune()``, the recipe modifiers and
``curvature sweep --methods`` resolve names here (:func:`pipeline`), so a new method or part is
one :func:`register` or :func:`register_part` line.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from curvature.core.registry import Registry as _Registry
from curvature.pruning import parts as P


@dataclass(frozen=True)
class Method:
    """A registered method: its name, the factory of its chooser, a description."""

    name: str
    make: Callable[[], P.Chooser]
    description: str


class Registry(_Registry):
    """Names of presets (``kind="pruning method"``) or of added parts (``kind="part"``); a
    method name may carry ``+`` parts: ``METHODS["sparsegpt+reconstruct"]`` is its pipeline."""

    def __contains__(self, name) -> bool:
        try:
            pipeline(name)
        except (ValueError, TypeError):
            return False
        return True

    def __getitem__(self, name: str) -> P.Pipeline:
        return pipeline(name)


METHODS = Registry("pruning method")
PARTS = _Registry("part")


def register(name: str, chooser, solver=None, description: str = "") -> Method:
    """Add a method: ``register(name, factory, description=...)`` with a factory of a chooser
    part, or ``register(name, CurvatureClass, SolverClass, description)`` for a gradient-driver
    method made of a :class:`~curvature.pruning.curvatures.Curvature` and a
    :class:`~curvature.pruning.solvers.Solver`."""
    if solver is not None:
        curv = chooser
        method = Method(
            name,
            lambda: P.Custom(make_curvature=curv, make_solver=solver, name=name),
            description,
        )
    else:
        method = Method(name, chooser, description)
    METHODS.add(name, method)
    return method


def register_part(name: str, factory: Callable[[], P.Part]) -> None:
    """Add a part a method name may add with ``+name`` (a factory of the part with defaults)."""
    PARTS.add(name, factory)


def split_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"sparsegpt+reconstruct+fisher"`` -> ``("sparsegpt", ("reconstruct", "fisher"))``; an
    unknown or repeated part raises one line naming it and the nearest valid one."""
    base, *added = str(spec).split("+")
    for p in added:
        if p not in PARTS.names():
            near = difflib.get_close_matches(p, PARTS.names(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(
                f"method {spec!r}: unknown part {p!r}{hint}; parts: {', '.join(PARTS.names())}"
            )
    if len(set(added)) != len(added):
        raise ValueError(f"method {spec!r}: a part is named twice")
    return base, tuple(added)


def pipeline(method) -> P.Pipeline:
    """A method name, a part, or a pipeline, as a :class:`~curvature.pruning.parts.Pipeline`."""
    if isinstance(method, P.Pipeline):
        return method
    if isinstance(method, P.Part):
        return P.chain(method)
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a method name, a part or a pipeline of parts, got {method!r}"
        )
    base, added = split_spec(method)
    if base not in METHODS.names():
        near = difflib.get_close_matches(base, METHODS.names(), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(
            f"method must be one of {', '.join(repr(n) for n in METHODS.names())}, "
            f"got {base!r}{hint}"
        )
    return P.chain(METHODS.get(base).make(), *(PARTS.get(p)() for p in added))


register("obs", P.OBS, description="gradient-Fisher OBS, exact greedy selection in each block")
register(
    "obs-independent",
    lambda: P.OBS(selection="independent"),
    description="gradient-Fisher OBS, independent scores and summed corrections",
)
register(
    "mfac",
    lambda: P.OBS(inverse="mfac"),
    description="gradient-Fisher OBS with the Fisher inverse held in the M-FAC form",
)
register("magnitude", P.Magnitude, description="weight magnitude, no curvature, no correction")
register(
    "sparsegpt",
    P.SparseGPT,
    description="layer-wise OBS on each linear layer's input Hessian: the column sweep",
)
register(
    "obc", P.OBC, description="layer-wise OBS, exact greedy per row (Optimal Brain Compression)"
)
register("wanda", P.Wanda, description="|weight| x input norm within each output row, no update")

register_part("reconstruct", P.Reconstruct)
register_part("outlier", P.Outlier)
register_part("fisher", P.FisherObjective)
