"""Recipe modifiers: strict pydantic models in the recipe format's own field names.

Every modifier rejects unknown fields (``extra="forbid"``) and checks ranges; the loader turns the
errors into messages with the recipe line and the nearest valid field name.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curvature.core import checks
from curvature.pruning import METHODS
from curvature.pruning.masks import parse_mask
from curvature.pruning.schedule import interpolate, pruning_points


class Modifier(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    start_epoch: float = Field(0.0, ge=-1)
    end_epoch: float = Field(-1.0, ge=-1)
    # Where the modifier was defined (set by the loader, not a recipe field).
    line: int | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _order(self):
        if self.end_epoch != -1 and self.end_epoch < self.start_epoch:
            raise ValueError(
                f"end_epoch ({self.end_epoch}) is before start_epoch ({self.start_epoch})"
            )
        return self


class EpochRangeModifier(Modifier):
    pass


class _Pruning(Modifier):
    params: list[str] | str = "__ALL_PRUNABLE__"
    init_sparsity: float = Field(0.0, ge=0, lt=1)
    final_sparsity: float = Field(..., ge=0, lt=1)
    update_frequency: float = Field(1.0, ge=0)
    inter_func: Literal["cubic", "linear", "inverse_cubic"] = "cubic"
    global_sparsity: bool = True
    leave_enabled: bool = True
    mask_type: str = "unstructured"
    log_types: Any = None  # accepted for compatibility; logging goes through the trainer
    #: the registered pruning method this modifier runs (``curvature.pruning.METHODS``)
    METHOD: ClassVar[str] = "magnitude"

    @property
    def method(self) -> str:
        return self.METHOD

    def engine_settings(self) -> dict:
        """Keywords of :func:`curvature.pruning.prune` for one pruning point of this modifier."""
        return dict(
            method=self.method,
            mask=self.mask_type,
            params=self.params,
            num_grads=1,
            block_size=parse_mask(self.mask_type).run,
            damp=1.0,
            global_sparsity=self.global_sparsity,
        )

    @property
    def needs_gradients(self) -> bool:
        return METHODS[self.method].needs_gradients

    @field_validator("params")
    @classmethod
    def _params(cls, v):
        return [v] if isinstance(v, str) else v

    def schedule(self) -> list[tuple[float, float]]:
        """``(epoch, target sparsity)`` at every pruning point of this modifier."""
        end = self.end_epoch if self.end_epoch != -1 else self.start_epoch
        span = end - self.start_epoch
        points = pruning_points(
            start_epoch=self.start_epoch, end_epoch=end, update_frequency=self.update_frequency
        )
        delta = self.final_sparsity - self.init_sparsity
        return [
            (
                e,
                self.init_sparsity
                + delta
                * interpolate(1.0 if span <= 0 else (e - self.start_epoch) / span, self.inter_func),
            )
            for e in points
        ]

    @field_validator("mask_type")
    @classmethod
    def _mask(cls, v):
        parse_mask(v)
        return "block4" if v == "block" else v

    @model_validator(mode="after")
    def _sparsities(self):
        if self.final_sparsity < self.init_sparsity:
            raise ValueError(
                f"final_sparsity ({self.final_sparsity}) is below init_sparsity ({self.init_sparsity})"
            )
        nm = parse_mask(self.mask_type).fixed_sparsity
        if nm is not None and abs(self.final_sparsity - nm) > 1e-9:
            raise ValueError(f"mask_type {self.mask_type} needs final_sparsity {nm:g}")
        return self


class MagnitudePruningModifier(_Pruning):
    pass


class GlobalMagnitudePruningModifier(_Pruning):
    global_sparsity: bool = True


class OBSPruningModifier(_Pruning):
    num_grads: int = Field(1024, gt=0)
    damp: float = Field(1e-7, gt=0)
    fisher_block_size: int = Field(50, gt=0)
    grad_sampler_kwargs: dict[str, Any] = Field(default_factory=dict)
    num_recomputations: int = Field(1, ge=1)
    selection: Literal["greedy", "independent"] = "greedy"
    # Not a field of the published recipes: any registered gradient-curvature method.
    method_name: str = Field("obs", alias="method")

    @property
    def method(self) -> str:
        return self.method_name

    @field_validator("method_name")
    @classmethod
    def _method(cls, v):
        checks.one_of("method", v, [m for m in METHODS.names() if METHODS[m].needs_gradients])
        return v

    def engine_settings(self) -> dict:
        return dict(
            super().engine_settings(),
            num_grads=self.num_grads,
            block_size=self.fisher_block_size,
            damp=self.damp,
            num_recomputations=self.num_recomputations,
            selection=self.selection,
        )

    @model_validator(mode="after")
    def _block(self):
        run = parse_mask(self.mask_type).run
        if self.fisher_block_size % run:
            raise ValueError(
                f"fisher_block_size {self.fisher_block_size} is not a multiple of the "
                f"{self.mask_type} group of {run}"
            )
        unknown = set(self.grad_sampler_kwargs) - {"batch_size"}
        if unknown:
            raise ValueError(
                f"grad_sampler_kwargs: unknown key(s) {sorted(unknown)}; allowed: batch_size"
            )
        return self


class ConstantPruningModifier(Modifier):
    params: list[str] | str = "__ALL_PRUNABLE__"
    log_types: Any = None

    @field_validator("params")
    @classmethod
    def _params(cls, v):
        return [v] if isinstance(v, str) else v


class LearningRateFunctionModifier(Modifier):
    lr_func: Literal["linear", "cyclic_linear"] = "linear"
    init_lr: float = Field(..., ge=0)
    final_lr: float = Field(0.0, ge=0)
    cycle_epochs: float = Field(1.0, gt=0)
    update_frequency: float = -1.0
    param_groups: list[int] | None = None


class DistillationModifier(Modifier):
    hardness: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)
    distill_output_keys: list[str] = Field(default_factory=lambda: ["logits"])
    teacher: str | None = None  # model path; the CLI's --teacher overrides it


class OptimizerModifier(Modifier):
    """Chooses the optimizer (the recipe hook for the second-order optimizers)."""

    name: str = "adamw"
    kwargs: dict[str, Any] = Field(default_factory=dict)


MODIFIERS: dict[str, type[Modifier]] = {
    cls.__name__: cls
    for cls in (
        EpochRangeModifier,
        OBSPruningModifier,
        MagnitudePruningModifier,
        GlobalMagnitudePruningModifier,
        ConstantPruningModifier,
        LearningRateFunctionModifier,
        DistillationModifier,
        OptimizerModifier,
    )
}
