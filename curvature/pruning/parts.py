"""Pruning parts: values that carry their own validated settings, composed into a pipeline.

A pruning method is a :class:`Pipeline` of parts, built by :func:`chain` the way an optimizer is
built from gradient transformations::

    chain(Outlier(m=5.0, lam=0.08), SparseGPT(rel_damp=0.01, block=128), Reconstruct(tol=1e-3))

Every part checks its own arguments when it is constructed (:mod:`curvature.core.checks`, one
message style) and declares what it needs from the driver that runs it (:data:`GRADIENTS`,
:data:`LAYER_INPUTS`, :data:`OUTPUT_GRADIENTS`). A pipeline holds exactly one part that chooses
the mask (a :class:`Chooser`) and at most one part of each added role:

=============  ==================================================  ==========================
role           parts                                               driver
=============  ==================================================  ==========================
chooser        :class:`OBS`, :class:`Magnitude`                    gradient driver
chooser        :class:`SparseGPT`, :class:`OBC`, :class:`Wanda`    layer-wise driver
allocation     :class:`Outlier`                                    before either driver
objective      :class:`FisherObjective`                            inside the layer-wise pass
reconstruct    :class:`Reconstruct`                                inside (or after) a pass
=============  ==================================================  ==========================

The presets (``"obs"``, ``"sparsegpt"``, ...) and the ``+`` spelling of added parts
(``"sparsegpt+reconstruct+outlier+fisher"``) live in :mod:`curvature.pruning.registry`. A new
part is a new class with a ``role`` (and, for an allocation, an :meth:`Allocation.allocate`) and
one registry line; the drivers read roles, never names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from curvature.core import checks
from curvature.pruning.curvatures import Curvature, EmpiricalFisher, Identity, LayerHessian
from curvature.pruning.solvers import (
    OBC as OBCSolver,
)
from curvature.pruning.solvers import (
    GreedyOBS,
    IndependentOBS,
    LayerSolver,
    ScoreOnly,
    Solver,
)
from curvature.pruning.solvers import (
    SparseGPT as SparseGPTSolver,
)
from curvature.pruning.solvers import (
    Wanda as WandaSolver,
)

#: what a part needs from its driver
GRADIENTS = "gradients"  # per-example gradients of the loss (the gradient driver collects them)
LAYER_INPUTS = "layer inputs"  # each linear layer's inputs (calibration forward passes)
OUTPUT_GRADIENTS = "output gradients"  # gradients of the loss w.r.t. each layer's outputs

#: calibration batches read by an added part when the chooser reads no data (magnitude)
DEFAULT_BATCHES = 128

SELECTIONS = ("greedy", "independent")
INVERSES = ("auto", "woodbury", "mfac")
DTYPES = (torch.float64, torch.float32)


class Part:
    """A pruning part: a frozen value with validated settings and a role in the pipeline."""

    #: ``"chooser"``, ``"allocation"``, ``"objective"`` or ``"reconstruct"``
    role: ClassVar[str] = ""
    #: the name of the part in a ``+`` spelling (``"reconstruct"``) or of the chooser's preset
    label: ClassVar[str] = ""
    #: what the driver must provide (:data:`GRADIENTS`, :data:`LAYER_INPUTS`, ...)
    needs: ClassVar[frozenset] = frozenset()

    def check(self, call, pipeline: Pipeline) -> None:
        """Refuse (one line) a combination with the call's settings or the other parts that
        this part cannot honour; every setting that is accepted acts."""


class Chooser(Part):
    """A part that chooses the mask and the kept weights: one per pipeline."""

    role = "chooser"
    #: ``"gradient"`` (curvature from gradients, global allocation) or ``"layer"`` (one linear
    #: layer at a time from its calibration inputs)
    driver: ClassVar[str] = "gradient"
    #: the mask structures the chooser supports (``"N:M"`` for every N:M mask)
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "block4", "N:M")

    @property
    def batches(self) -> int | None:
        """Batches of data it reads (``None``: it reads none)."""
        return None

    @property
    def global_default(self) -> bool:
        """Whether one threshold over all parameters is its default allocation."""
        return self.driver == "gradient"

    def curvature(self) -> Curvature:
        raise NotImplementedError  # pragma: no cover - interface

    def solver(self) -> Solver:
        raise NotImplementedError  # pragma: no cover - interface

    def check(self, call, pipeline) -> None:
        structure = call.structure
        kind = "N:M" if structure.nm else structure.name
        if kind not in self.structures:
            raise ValueError(
                f"mask {call.mask!r}: method {self.label} supports "
                f"{', '.join(self.structures)} masks"
            )


# ---------------------------------------------------------------------------------------------
# choosers of the gradient driver


@dataclass(frozen=True)
class OBS(Chooser):
    """Gradient-Fisher OBS on blocks of ``block_size`` weights.

    ``gradients``: per-example gradients in the empirical Fisher (one per batch of data);
    ``fisher_damping``: the absolute damping ``lambda`` of ``lambda I + (1/m) sum g g^T``;
    ``selection``: ``"greedy"`` (exact one-at-a-time OBS in each block) or ``"independent"``
    (score once, prune together, sum the corrections); ``inverse``: how the inverse is held
    (``"woodbury"`` blocks, the ``"mfac"`` form, or ``"auto"``: whichever stores less);
    ``dtype``: storage of the inverse; ``recomputations``: steps between which the gradients are
    collected again.
    """

    gradients: int = 1024
    block_size: int = 50
    fisher_damping: float = 1e-7
    selection: str = "greedy"
    inverse: str = "auto"
    dtype: torch.dtype = torch.float64
    recomputations: int = 1
    needs: ClassVar[frozenset] = frozenset({GRADIENTS})

    def __post_init__(self):
        checks.positive_int("gradients", self.gradients)
        checks.positive_int("block_size", self.block_size)
        checks.positive("fisher_damping", self.fisher_damping)
        checks.one_of("selection", self.selection, SELECTIONS)
        checks.one_of("inverse", self.inverse, INVERSES)
        checks.one_of("dtype", self.dtype, DTYPES)
        checks.integer_at_least("recomputations", self.recomputations, 1)

    @property
    def label(self) -> str:  # type: ignore[override]
        # the preset names: mfac (either selection; the report gives the selection) and obs
        if self.inverse == "mfac":
            return "mfac"
        return "obs" if self.selection == "greedy" else f"obs-{self.selection}"

    @property
    def batches(self) -> int:
        return self.gradients

    def curvature(self) -> Curvature:
        return EmpiricalFisher(
            algorithm=self.inverse,
            gradients=self.gradients,
            damping=self.fisher_damping,
            dtype=self.dtype,
        )

    def solver(self) -> Solver:
        return GreedyOBS() if self.selection == "greedy" else IndependentOBS()

    def check(self, call, pipeline) -> None:
        super().check(call, pipeline)
        _block_fits(self.block_size, call)


@dataclass(frozen=True)
class Magnitude(Chooser):
    """Weight magnitude: no curvature, no correction, no data."""

    block_size: int = 50
    label: ClassVar[str] = "magnitude"

    def __post_init__(self):
        checks.positive_int("block_size", self.block_size)

    @property
    def recomputations(self) -> int:
        return 1

    @property
    def gradients(self) -> int:
        return 0

    def curvature(self) -> Curvature:
        return Identity()

    def solver(self) -> Solver:
        return ScoreOnly()

    def check(self, call, pipeline) -> None:
        super().check(call, pipeline)
        _block_fits(self.block_size, call)


@dataclass(frozen=True)
class Custom(Chooser):
    """A gradient-driver chooser made of any :class:`Curvature` and :class:`Solver` factories
    (what :func:`curvature.pruning.registry.register` builds from two classes); the curvature
    carries its own settings."""

    make_curvature: object = None
    make_solver: object = None
    name: str = "custom"
    block_size: int = 50

    def __post_init__(self):
        if not callable(self.make_curvature) or not callable(self.make_solver):
            raise TypeError("Custom: make_curvature and make_solver must be callables")
        checks.positive_int("block_size", self.block_size)

    @property
    def label(self) -> str:  # type: ignore[override]
        return self.name

    @property
    def recomputations(self) -> int:
        return 1

    @property
    def needs(self) -> frozenset:  # type: ignore[override]
        return frozenset({GRADIENTS}) if self.curvature().needs_gradients else frozenset()

    @property
    def gradients(self) -> int:
        return getattr(self.curvature(), "gradients", 0) if self.needs else 0

    @property
    def batches(self) -> int | None:
        return self.gradients or None

    def curvature(self) -> Curvature:
        return self.make_curvature()

    def solver(self) -> Solver:
        return self.make_solver()

    def check(self, call, pipeline) -> None:
        super().check(call, pipeline)
        _block_fits(self.block_size, call)


def _block_fits(block_size: int, call) -> None:
    run = call.structure.run
    if block_size % run:
        raise ValueError(
            f"block_size {block_size} is not a multiple of the {call.structure.name} group of {run}"
        )


# ---------------------------------------------------------------------------------------------
# choosers of the layer-wise driver


@dataclass(frozen=True)
class _Layerwise(Chooser):
    """Shared settings of the layer-wise choosers: ``batches`` calibration batches, read block by
    block on the outputs of the pruned blocks before (``sequential=True``) or all from the dense
    model (``False``); ``precision``: the float type of each batch's ``X^T X`` product (summed
    over batches in float64 either way) and of SparseGPT's column sweep: ``"float64"`` (the
    default, what the tests compare against) or ``"float32"`` (the published code's type, about
    half the time of those products)."""

    batches: int = DEFAULT_BATCHES  # type: ignore[assignment]
    sequential: bool = True
    precision: str = "float64"
    driver: ClassVar[str] = "layer"
    needs: ClassVar[frozenset] = frozenset({LAYER_INPUTS})
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "N:M")
    #: the layer's ``H`` is needed whole (else only its diagonal)
    full_hessian: ClassVar[bool] = True

    def __post_init__(self):
        checks.positive_int("batches", self.batches)
        _boolean("sequential", self.sequential)
        checks.one_of("precision", self.precision, ("float64", "float32"))

    @property
    def dtype(self) -> torch.dtype:
        """The float type of the calibration products and of the sweep (``precision``)."""
        return getattr(torch, self.precision)

    @property
    def rel_damping(self) -> float:
        """Damping of ``H`` as a fraction of its mean diagonal (solvers without one: 0.01, only
        read by a reconstruction in the same pass)."""
        return getattr(self, "rel_damp", 0.01)

    def curvature(self) -> Curvature:
        return LayerHessian(diagonal=not self.full_hessian)

    def check(self, call, pipeline) -> None:
        super().check(call, pipeline)
        if call.global_sparsity:
            raise ValueError(
                f"global_sparsity: method {self.label} prunes every layer to its target "
                "(layer-wise errors are not comparable across layers); pass "
                "global_sparsity=False or a sparsity per parameter"
            )


@dataclass(frozen=True)
class SparseGPT(_Layerwise):
    """The column sweep with lazy updates on each linear layer's input Hessian; ``rel_damp``:
    damping of ``H`` as a fraction of its mean diagonal, ``block``: columns per lazy batch."""

    rel_damp: float = 0.01
    block: int = 128
    label: ClassVar[str] = "sparsegpt"
    #: row weights (a Fisher objective) change which weights it prunes
    compares_rows: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        checks.positive("rel_damp", self.rel_damp)
        checks.positive_int("block", self.block)

    def solver(self) -> LayerSolver:
        return SparseGPTSolver(block=self.block, dtype=self.dtype)


@dataclass(frozen=True)
class OBC(_Layerwise):
    """Exact greedy OBS per row on ``H^-1`` (Optimal Brain Compression)."""

    rel_damp: float = 0.01
    label: ClassVar[str] = "obc"
    structures: ClassVar[tuple[str, ...]] = ("unstructured", "block4", "N:M")
    compares_rows: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        checks.positive("rel_damp", self.rel_damp)

    def solver(self) -> LayerSolver:
        return OBCSolver()


@dataclass(frozen=True)
class Wanda(_Layerwise):
    """``|W_ij| * ||X_j||`` compared within each output row, no update."""

    label: ClassVar[str] = "wanda"
    full_hessian: ClassVar[bool] = False
    compares_rows: ClassVar[bool] = False

    def solver(self) -> LayerSolver:
        return WandaSolver()


# ---------------------------------------------------------------------------------------------
# added parts


class Allocation(Part):
    """A part that gives each layer its own target before the chooser runs."""

    role = "allocation"

    def allocate(self, model, data, loss_fn, targets, sparsity, context) -> dict[str, float]:
        """``{layer name: sparsity}`` for the layer targets ``targets`` (averaging ``sparsity``
        over their sizes); ``context`` has ``batches`` and ``progress``."""
        raise NotImplementedError  # pragma: no cover - interface

    def check(self, call, pipeline) -> None:
        if call.structure.nm:
            raise ValueError(
                f"{self.label}: the {call.mask} mask fixes every layer's sparsity; a per-layer "
                "allocation needs an unstructured or block mask"
            )
        if call.per_parameter:
            raise ValueError(
                f"{self.label} computes the per-layer targets itself; pass one sparsity, not a "
                "mapping"
            )


@dataclass(frozen=True)
class Outlier(Allocation):
    """Each block's target from its share of outlier activation scores ``|W_ij| ||X_j||``
    (above ``m`` times the block's mean), within ``sparsity +- lam`` and averaging to it.
    ``batches``: calibration batches of its dense pass (as :class:`Reconstruct`'s)."""

    m: float = 5.0
    lam: float = 0.08
    batches: int | None = None
    label: ClassVar[str] = "outlier"
    needs: ClassVar[frozenset] = frozenset({LAYER_INPUTS})

    def __post_init__(self):
        checks.positive("m", self.m)
        checks.in_range("lam", self.lam, 0.0, 1.0, "[)")
        _optional_batches(self.batches)

    def check(self, call, pipeline) -> None:
        super().check(call, pipeline)
        _own_batches_fit(self, pipeline)

    def allocate(self, model, data, loss_fn, targets, sparsity, context) -> dict[str, float]:
        from curvature.pruning import layerwise

        return layerwise.outlier_sparsities(
            model, data, loss_fn, targets, sparsity, (self, context)
        )


@dataclass(frozen=True)
class FisherObjective(Part):
    """The layer objective weighted by the gradient Fisher of each layer's outputs, mixed with
    uniform weights by ``mix`` (output rows) and ``token_mix`` (tokens, off by default)."""

    mix: float = 0.5
    token_mix: float = 0.0
    role: ClassVar[str] = "objective"
    label: ClassVar[str] = "fisher"
    needs: ClassVar[frozenset] = frozenset({LAYER_INPUTS, OUTPUT_GRADIENTS})

    def __post_init__(self):
        checks.in_range("mix", self.mix, 0.0, 1.0, "[]")
        checks.in_range("token_mix", self.token_mix, 0.0, 1.0, "[]")

    def check(self, call, pipeline) -> None:
        chooser = pipeline.chooser
        if chooser.driver != "layer" and pipeline.reconstruct is None:
            raise ValueError(
                f"fisher weights the layer objective of the layer-wise methods and of "
                f"reconstruct; method {chooser.label} reads no layer objective: add reconstruct "
                "or choose a layer-wise method"
            )
        if self.token_mix:
            return
        compares = getattr(chooser, "compares_rows", False) and not call.structure.nm
        if not compares:
            raise ValueError(
                f"fisher with token_mix=0 changes nothing for method {chooser.label} with mask "
                f"{call.mask}: its row weights matter only where rows are compared (sparsegpt "
                "or obc, unstructured); set token_mix > 0 or drop the fisher part"
            )


@dataclass(frozen=True)
class Reconstruct(Part):
    """Re-solve the kept weights of every linear layer for the chosen mask: least squares on
    the layer inputs by preconditioned conjugate gradients to a relative residual ``tol`` or
    ``iters`` iterations, ``H`` damped by ``rel_damp`` of its mean diagonal. Inside the layer-wise
    pass, or one more calibration pass (``sequential`` as the layer-wise choosers) after a
    gradient method. ``batches``: the calibration batches of that pass, one count with an
    :class:`Outlier` part's (``None`` on both: the chooser's count, or :data:`DEFAULT_BATCHES`
    after magnitude); inside the layer-wise pass it reads the chooser's batches and another
    count is refused."""

    tol: float = 1e-3
    iters: int = 100
    rel_damp: float = 0.01
    sequential: bool = True
    batches: int | None = None
    role: ClassVar[str] = "reconstruct"
    label: ClassVar[str] = "reconstruct"
    needs: ClassVar[frozenset] = frozenset({LAYER_INPUTS})

    def __post_init__(self):
        checks.positive("tol", self.tol)
        checks.positive_int("iters", self.iters)
        checks.positive("rel_damp", self.rel_damp)
        _boolean("sequential", self.sequential)
        _optional_batches(self.batches)

    def check(self, call, pipeline) -> None:
        _own_batches_fit(self, pipeline)


def _optional_batches(value) -> None:
    if value is not None:
        checks.positive_int("batches", value)


def _own_batches_fit(part: Part, pipeline: Pipeline) -> None:
    """Refuse (one line) an added part's own ``batches`` that cannot act: inside the layer-wise
    pass every part reads the chooser's batches, and the added parts of a gradient method share
    one count."""
    if part.batches is None:
        return
    if pipeline.layerwise and part.batches != pipeline.chooser.batches:
        raise ValueError(
            f"{part.label} batches={part.batches}: inside the layer-wise pass it reads "
            f"{pipeline.chooser.label}'s batches={pipeline.chooser.batches}; set one count"
        )
    if len(set(pipeline.added_batches)) > 1:
        raise ValueError(
            f"{part.label} batches={part.batches}: the added parts of {pipeline.spec} read one "
            f"count of calibration batches, got {sorted(set(pipeline.added_batches))}"
        )


def _boolean(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


# ---------------------------------------------------------------------------------------------
# the pipeline

ROLES = ("chooser", "allocation", "objective", "reconstruct")


@dataclass(frozen=True)
class Pipeline:
    """One chooser and at most one part of each added role (see :func:`chain`)."""

    parts: tuple = field(default_factory=tuple)

    def __post_init__(self):
        seen: dict[str, Part] = {}
        for p in self.parts:
            if not isinstance(p, Part):
                raise TypeError(
                    f"method: {p!r} is not a pruning part; parts are the values of "
                    "curvature.pruning.parts (OBS, SparseGPT, Outlier, Reconstruct, ...)"
                )
            if p.role not in ROLES:
                raise ValueError(f"method: part {type(p).__name__} has no role ({ROLES})")
            if p.role in seen:
                raise ValueError(
                    f"method: two {p.role} parts ({seen[p.role].label} and {p.label}); a "
                    f"pipeline holds one of each role"
                )
            seen[p.role] = p
        if "chooser" not in seen:
            raise ValueError(
                "method: no part chooses the mask; add one of OBS, Magnitude, SparseGPT, OBC, Wanda"
            )

    def _role(self, role: str):
        return next((p for p in self.parts if p.role == role), None)

    @property
    def chooser(self) -> Chooser:
        return self._role("chooser")

    @property
    def allocation(self) -> Allocation | None:
        return self._role("allocation")

    @property
    def objective(self) -> FisherObjective | None:
        return self._role("objective")

    @property
    def reconstruct(self) -> Reconstruct | None:
        return self._role("reconstruct")

    @property
    def added(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.role != "chooser")

    @property
    def needs(self) -> frozenset:
        out: frozenset = frozenset()
        for p in self.parts:
            out |= p.needs
        return out

    @property
    def needs_data(self) -> bool:
        """Whether pruning reads data and a loss function (gradients or layer inputs)."""
        return bool(self.needs)

    @property
    def layerwise(self) -> bool:
        return self.chooser.driver == "layer"

    @property
    def needs_gradients(self) -> bool:
        return GRADIENTS in self.chooser.needs

    @property
    def batches(self) -> int:
        """Calibration batches the added parts read: the chooser's inside the layer-wise pass;
        after a gradient method their own ``batches`` when set, else the chooser's count (OBS's
        gradients), else :data:`DEFAULT_BATCHES` (magnitude reads no data)."""
        if not self.layerwise and self.added_batches:
            return self.added_batches[0]
        return self.chooser.batches or DEFAULT_BATCHES

    @property
    def added_batches(self) -> list[int]:
        """The ``batches`` set on added parts (reconstruct, outlier), in pipeline order."""
        return [p.batches for p in self.added if getattr(p, "batches", None) is not None]

    @property
    def spec(self) -> str:
        """The pipeline as a name: ``sparsegpt+reconstruct+outlier+fisher`` (added parts in the
        order of :data:`ROLES`' registry spelling)."""
        order = {"reconstruct": 0, "allocation": 1, "objective": 2}
        added = sorted(self.added, key=lambda p: (order.get(p.role, 3), p.label))
        return "+".join([self.chooser.label, *(p.label for p in added)])

    def settings(self) -> tuple[str, ...]:
        """The names of every part's settings (its dataclass fields), sorted."""
        return tuple(sorted({name for p in self.parts for name in _setting_names(p)}))

    def with_settings(self, **values) -> Pipeline:
        """The same pipeline with settings set by name on every part that has them:
        ``pipeline("sparsegpt+reconstruct").with_settings(rel_damp=0.02, tol=1e-4)``. A name no
        part has is refused with the nearest valid one."""
        import difflib

        valid = self.settings()
        unknown = [k for k in values if k not in valid]
        if unknown:
            near = difflib.get_close_matches(unknown[0], valid, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(
                f"{unknown[0]}: no part of {self.spec} has this setting{hint}; settings: "
                f"{', '.join(valid)}"
            )
        new = []
        for p in self.parts:
            mine = {k: v for k, v in values.items() if k in _setting_names(p)}
            new.append(dataclasses.replace(p, **mine) if mine else p)
        return Pipeline(tuple(new))

    def check(self, call) -> None:
        """Every part checks the call's settings and its neighbours (one line on refusal)."""
        for p in self.parts:
            p.check(call, self)


def _setting_names(part: Part) -> set[str]:
    return {f.name for f in dataclasses.fields(part)} if dataclasses.is_dataclass(part) else set()


def chain(*parts: Part) -> Pipeline:
    """The pipeline of ``parts``: one chooser, at most one part of each added role."""
    flat: list[Part] = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, Pipeline) else (p,))
    return Pipeline(tuple(flat))
