"""What a pruning call did: the report both drivers return."""

from __future__ import annotations

from dataclasses import dataclass, field

from curvature.pruning.masks import MaskSet


@dataclass
class PruneReport:
    """What a pruning call did."""

    method: str
    mask: str
    selection: str
    target_sparsity: float
    global_sparsity: float  # reached, over the selected parameters
    param_sparsity: dict[str, float]
    estimated_loss_increase: float | None  # sum of the OBS costs of the pruned groups
    gradients: int  # gradients per Fisher (requested)
    seconds: float
    # distinct batches behind them: fewer than gradients when the data was cycled
    distinct_batches: int | None = None
    # parameters a ``re:`` pattern matched but that were left out, with the reason
    skipped: dict[str, str] = field(default_factory=dict)
    memory_groups: int = 1  # groups of parameters whose curvature was built at once (most per step)
    memory_plan: dict = field(default_factory=dict)  # bytes of each large buffer (largest step)
    #: seconds of each phase (layer-wise: ``calibration`` forward passes and ``solve``)
    phases: dict = field(default_factory=dict)
    #: fixed-mask reconstruction: damped layer errors summed before and after, the most
    #: iterations and the largest final relative residual (``None`` without it)
    reconstruction: dict | None = None
    #: the outlier allocation's target of each parameter (``None`` without it)
    allocation: dict | None = None
    masks: MaskSet = field(repr=False, default_factory=MaskSet)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "masks"}
        return d
