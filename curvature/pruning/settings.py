"""The settings of one pruning call: one frozen object, validated once when it is made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from curvature.core import checks
from curvature.pruning.masks import MaskStructure, parse_mask
from curvature.pruning.registry import LAYERWISE, METHODS, SOLVER_CHOICES, split_spec

ALLOCATIONS = ("default", "outlier")
OBJECTIVES = ("plain", "fisher")


@dataclass(frozen=True)
class PruneSettings:
    """Everything that decides what a pruning call computes (the model, data and loss aside).

    Made by :func:`curvature.pruning.prune` from its keywords; every field is checked here, with
    a message naming the argument, the value and what is allowed.
    """

    #: one target over the selected parameters, or ``((name, sparsity), ...)`` per parameter
    sparsity: float | tuple[tuple[str, float], ...]
    method: str = "obs"
    mask: str = "unstructured"
    params: str | tuple[str, ...] = "__ALL_PRUNABLE__"
    num_grads: int = 1024
    block_size: int = 50
    damp: float = 1e-7
    num_recomputations: int = 1
    selection: str = "greedy"
    #: one threshold over all parameters; ``None``: the method's default (``True``, or ``False``
    #: for the layer-wise methods, which prune every layer to the target)
    global_sparsity: bool | None = None
    fisher_dtype: torch.dtype = torch.float64
    max_memory: int | None = None
    progress: bool = True
    #: layer-wise methods: damping of ``H`` as a fraction of its mean diagonal
    layer_damp: float = 0.01
    #: layer-wise methods: calibrate each block on the outputs of the pruned blocks before it
    #: (``None``: ``True``); other methods have no such choice
    sequential: bool | None = None
    #: re-solve the kept weights of every linear layer for the chosen mask
    #: (:mod:`curvature.pruning.reconstruct`), to a relative residual ``reconstruct_tol`` or
    #: ``reconstruct_iters`` conjugate-gradient iterations
    reconstruct: bool = False
    reconstruct_tol: float = 1e-3
    reconstruct_iters: int = 100
    #: ``"outlier"``: a target per block from its outlier activations, within
    #: ``sparsity +- outlier_lambda``, averaging to ``sparsity``
    allocation: str = "default"
    outlier_m: float = 5.0
    outlier_lambda: float = 0.08
    #: ``"fisher"``: the layer objective weighted by the output gradient Fisher, mixed with the
    #: uniform weights by ``fisher_mix`` (:mod:`curvature.pruning.fisher_objective`)
    objective: str = "plain"
    fisher_mix: float = 0.5
    fisher_token_mix: float = 0.0

    def __post_init__(self):
        base, parts = split_spec(self.method)
        checks.one_of("method", base, METHODS.names())
        if parts:  # "sparsegpt+reconstruct+outlier+fisher": the parts as keywords
            object.__setattr__(self, "method", base)
            if "reconstruct" in parts:
                object.__setattr__(self, "reconstruct", True)
            if "outlier" in parts:
                object.__setattr__(self, "allocation", "outlier")
            if "fisher" in parts:
                object.__setattr__(self, "objective", "fisher")
        checks.one_of("allocation", self.allocation, ALLOCATIONS)
        checks.one_of("objective", self.objective, OBJECTIVES)
        if not isinstance(self.reconstruct, bool):
            raise ValueError(f"reconstruct must be True or False, got {self.reconstruct!r}")
        if not (isinstance(self.reconstruct_tol, (int, float)) and self.reconstruct_tol > 0):
            raise ValueError(f"reconstruct_tol must be > 0, got {self.reconstruct_tol!r}")
        checks.positive_int("reconstruct_iters", self.reconstruct_iters)
        if not (isinstance(self.outlier_m, (int, float)) and self.outlier_m > 0):
            raise ValueError(f"outlier_m must be > 0, got {self.outlier_m!r}")
        if not (isinstance(self.outlier_lambda, (int, float)) and 0 <= self.outlier_lambda < 1):
            raise ValueError(f"outlier_lambda must be in [0, 1), got {self.outlier_lambda!r}")
        for key in ("fisher_mix", "fisher_token_mix"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ValueError(f"{key} must be in [0, 1], got {v!r}")
        layerwise = METHODS[self.method].layerwise
        if self.objective == "fisher" and not (layerwise or self.reconstruct):
            raise ValueError(
                f"objective='fisher' weights the layer objective of the layer-wise methods "
                f"({', '.join(LAYERWISE)}) and of reconstruct; method {self.method} reads no "
                "layer objective: add reconstruct=True or choose a layer-wise method"
            )
        if self.objective == "fisher" and not self.fisher_token_mix:
            compares_rows = self.method in ("sparsegpt", "obc") and not parse_mask(self.mask).nm
            if not compares_rows:
                raise ValueError(
                    f"objective='fisher' with fisher_token_mix=0 changes nothing for method "
                    f"{self.method} with mask {self.mask}: its row weights matter only where "
                    "rows are compared (sparsegpt or obc, unstructured); set fisher_token_mix > 0 "
                    "or drop the fisher part"
                )
        if self.allocation == "outlier":
            if parse_mask(self.mask).nm:
                raise ValueError(
                    f"allocation='outlier': the {self.mask} mask fixes every layer's sparsity; "
                    "outlier allocation needs an unstructured or block mask"
                )
            if isinstance(self.sparsity, (Mapping, tuple)):
                raise ValueError(
                    "allocation='outlier' computes the per-layer targets itself; pass one "
                    "sparsity, not a mapping"
                )
        if self.global_sparsity is None:
            object.__setattr__(self, "global_sparsity", not layerwise)
        if layerwise:
            if self.global_sparsity:
                raise ValueError(
                    f"global_sparsity: method {self.method} prunes every layer to its target "
                    "(layer-wise errors are not comparable across layers); pass "
                    "global_sparsity=False or a sparsity per parameter"
                )
            if self.num_recomputations != 1:
                raise ValueError(
                    f"num_recomputations: method {self.method} reads no gradients; it is 1 for "
                    "layer-wise methods"
                )
            if not isinstance(self.layer_damp, (int, float)) or not self.layer_damp > 0:
                raise ValueError(f"layer_damp must be > 0, got {self.layer_damp!r}")
            if self.sequential is None:
                object.__setattr__(self, "sequential", True)
            solver = METHODS[self.method].solver()
            kind = "N:M" if parse_mask(self.mask).nm else parse_mask(self.mask).name
            if kind not in solver.structures:
                raise ValueError(
                    f"mask {self.mask!r}: method {self.method} supports "
                    f"{', '.join(solver.structures)} masks"
                )
        elif self.sequential is not None and not self.reconstruct:
            raise ValueError(
                f"sequential: only the layer-wise methods ({', '.join(LAYERWISE)}) and "
                f"reconstruct calibrate layer by layer; method {self.method} does not read it"
            )
        checks.one_of("selection", self.selection, SOLVER_CHOICES)
        if isinstance(self.sparsity, Mapping):
            object.__setattr__(self, "sparsity", tuple(self.sparsity.items()))
        if isinstance(self.sparsity, tuple):
            if not self.sparsity:
                raise ValueError("sparsity: the mapping of parameter names to sparsities is empty")
            for name, s in self.sparsity:
                checks.in_unit_interval(f"sparsity[{name!r}]", s)
        else:
            checks.in_unit_interval("sparsity", self.sparsity)
        structure = self.structure  # parses, or names the mask
        fixed = structure.fixed_sparsity
        for s in self.targets().values():
            if fixed is not None and abs(s - fixed) > 1e-9:
                raise ValueError(
                    f"mask {structure.name} prunes exactly {fixed:g}; got sparsity {s}"
                )
        checks.positive_int("block_size", self.block_size)
        if self.block_size % structure.run and not METHODS[self.method].layerwise:
            raise ValueError(
                f"block_size {self.block_size} is not a multiple of the {structure.name} group "
                f"of {structure.run}"
            )
        checks.integer_at_least("num_recomputations", self.num_recomputations, 1)
        if METHODS[self.method].needs_gradients:
            checks.positive_int("num_grads", self.num_grads)
            if not isinstance(self.damp, (int, float)) or not self.damp > 0:
                raise ValueError(f"damp must be > 0, got {self.damp!r}")
        if self.max_memory is not None:
            checks.positive_int("max_memory", self.max_memory)
        if not isinstance(self.params, str):
            object.__setattr__(self, "params", tuple(self.params))

    @property
    def spec(self) -> str:
        """The method with its parts, as a name: ``sparsegpt+reconstruct+outlier+fisher``."""
        parts = [
            name
            for name, on in (
                ("reconstruct", self.reconstruct),
                ("outlier", self.allocation == "outlier"),
                ("fisher", self.objective == "fisher"),
            )
            if on
        ]
        return "+".join([self.method, *parts])

    @property
    def structure(self) -> MaskStructure:
        return parse_mask(self.mask)

    @property
    def per_parameter(self) -> bool:
        return isinstance(self.sparsity, tuple)

    def targets(self) -> dict[str, float]:
        """``{parameter name: sparsity}`` (``{"": sparsity}`` for one target over all)."""
        return dict(self.sparsity) if self.per_parameter else {"": self.sparsity}
