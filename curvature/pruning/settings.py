"""The call-wide settings of one pruning call: one frozen object, validated once when made.

What a method computes is in its parts (:mod:`curvature.pruning.parts`), each with its own
settings; this object holds only what every method shares: the target, the mask structure, the
parameters, the allocation across them, the memory budget and the progress bars. No field is
rewritten after construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from curvature.core import checks
from curvature.pruning.masks import MaskStructure, parse_mask


def _targets(sparsity) -> float | tuple[tuple[str, float], ...]:
    """One target in ``[0, 1)``, or a non-empty ``((name, sparsity), ...)``."""
    if isinstance(sparsity, Mapping):
        sparsity = tuple(sparsity.items())
    if isinstance(sparsity, (tuple, list)):
        if not sparsity:
            raise ValueError("sparsity: the mapping of parameter names to sparsities is empty")
        for name, s in sparsity:
            checks.in_unit_interval(f"sparsity[{name!r}]", s)
        return tuple(tuple(x) for x in sparsity)
    checks.in_unit_interval("sparsity", sparsity)
    return sparsity


@dataclass(frozen=True, init=False)
class PruneSettings:
    """The call-wide settings (the model, data, loss and the method's parts aside).

    ``sparsity``: one target over the selected parameters, or ``{name: sparsity}`` per
    parameter (``params`` is then those names); ``mask``: ``"unstructured"``, ``"block4"`` or
    ``"N:M"``; ``params``: names, ``re:`` patterns or ``__ALL_PRUNABLE__``;
    ``global_sparsity``: one threshold over all parameters (``True``) or the target per layer
    (``False``); ``max_memory``: bytes the curvature may take (``None``: 60% of what is
    available); ``progress``: progress bars.
    """

    sparsity: float | tuple[tuple[str, float], ...]
    mask: str
    params: str | tuple[str, ...]
    global_sparsity: bool
    max_memory: int | None
    progress: bool

    def __init__(
        self,
        sparsity,
        *,
        mask: str = "unstructured",
        params="__ALL_PRUNABLE__",
        global_sparsity: bool = True,
        max_memory: int | None = None,
        progress: bool = True,
    ):
        sparsity = _targets(sparsity)
        if isinstance(sparsity, tuple):
            params = tuple(n for n, _ in sparsity)
        if not isinstance(global_sparsity, bool):
            raise ValueError(f"global_sparsity must be True or False, got {global_sparsity!r}")
        if max_memory is not None:
            checks.positive_int("max_memory", max_memory)
        structure = parse_mask(mask)  # parses, or names the mask
        fixed = structure.fixed_sparsity
        for s in (dict(sparsity) if isinstance(sparsity, tuple) else {"": sparsity}).values():
            if fixed is not None and abs(s - fixed) > 1e-9:
                raise ValueError(
                    f"mask {structure.name} prunes exactly {fixed:g}; got sparsity {s}"
                )
        values = {
            "sparsity": sparsity,
            "mask": mask,
            "params": params if isinstance(params, str) else tuple(params),
            "global_sparsity": global_sparsity,
            "max_memory": max_memory,
            "progress": bool(progress),
        }
        for k, v in values.items():
            object.__setattr__(self, k, v)

    @property
    def structure(self) -> MaskStructure:
        return parse_mask(self.mask)

    @property
    def per_parameter(self) -> bool:
        return isinstance(self.sparsity, tuple)

    @property
    def param_list(self) -> str | list[str]:
        """``params`` as :func:`~curvature.pruning.params.select_params` takes it."""
        return self.params if isinstance(self.params, str) else list(self.params)

    def targets(self) -> dict[str, float]:
        """``{parameter name: sparsity}`` (``{"": sparsity}`` for one target over all)."""
        return dict(self.sparsity) if self.per_parameter else {"": self.sparsity}
