"""The settings of one pruning call: one frozen object, validated once when it is made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from curvature.core import checks
from curvature.pruning.masks import MaskStructure, parse_mask
from curvature.pruning.registry import LAYERWISE, METHODS, SOLVER_CHOICES


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

    def __post_init__(self):
        checks.one_of("method", self.method, METHODS.names())
        layerwise = METHODS[self.method].layerwise
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
        elif self.sequential is not None:
            raise ValueError(
                f"sequential: only the layer-wise methods ({', '.join(LAYERWISE)}) calibrate "
                f"layer by layer; method {self.method} does not read it"
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
    def structure(self) -> MaskStructure:
        return parse_mask(self.mask)

    @property
    def per_parameter(self) -> bool:
        return isinstance(self.sparsity, tuple)

    def targets(self) -> dict[str, float]:
        """``{parameter name: sparsity}`` (``{"": sparsity}`` for one target over all)."""
        return dict(self.sparsity) if self.per_parameter else {"": self.sparsity}
