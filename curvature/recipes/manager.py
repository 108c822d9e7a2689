"""Apply a recipe during training: pruning schedules, masks, learning rate, distillation.

The manager is framework-free: a plain PyTorch loop calls :meth:`RecipeManager.step` with the
current (fractional) epoch; the Hugging Face callback in :mod:`curvature.integrations.hf` does the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from curvature.pruning import MaskSet, prune
from curvature.pruning.params import select_params
from curvature.recipes.loader import Recipe
from curvature.recipes.schema import (
    ConstantPruningModifier,
    DistillationModifier,
    GlobalMagnitudePruningModifier,
    LearningRateFunctionModifier,
    OptimizerModifier,
    _Pruning,
)

log = logging.getLogger(__name__)
_EPS = 1e-9


class RecipeManager:
    """Holds the recipe's state for one model: which pruning points ran, and the masks."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module) -> None:
        self.recipe = recipe
        self.model = model
        self.masks = MaskSet()
        self.history: list[dict] = []  # one entry per pruning step
        self._done: set[tuple[int, float]] = set()
        self._released: set[int] = set()
        for m in recipe.of(_Pruning, ConstantPruningModifier):
            select_params(model, m.params)  # fail now, naming the entry, not mid-training

    # ------------------------------------------------------------------ schedule
    def pruning_schedule(self) -> list[tuple[float, int, float]]:
        """``(epoch, modifier index, target sparsity)`` for every pruning point, in order."""
        out = [
            (e, i, target)
            for i, m in enumerate(self.recipe.modifiers)
            if isinstance(m, _Pruning)
            for e, target in m.schedule()
        ]
        return sorted(out)

    def due(self, epoch: float) -> list[tuple[float, int, float]]:
        """Pruning points at or before ``epoch`` not yet applied; only the latest per modifier.

        The earlier ones were overtaken (training steps coarser than the schedule): applying the
        latest marks them done too (:meth:`_mark_done`), so they never come back.
        """
        latest: dict[int, tuple[float, int, float]] = {}
        for e, i, s in self.pruning_schedule():
            if e <= epoch + _EPS and (i, e) not in self._done:
                latest[i] = (e, i, s)
        return sorted(latest.values())

    def _mark_done(self, index: int, epoch: float) -> None:
        for e, i, _ in self.pruning_schedule():
            if i == index and e <= epoch + _EPS:
                self._done.add((i, e))

    @property
    def first_pruning_epoch(self) -> float | None:
        sched = self.pruning_schedule()
        return sched[0][0] if sched else None

    # ------------------------------------------------------------------ actions
    def step(
        self,
        epoch: float,
        *,
        grad_data: Iterable | None = None,
        loss_fn: Callable | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        progress: bool = True,
    ) -> list[dict]:
        """Run whatever the recipe asks for at ``epoch``; returns the pruning steps taken."""
        taken = []
        for m in self.recipe.of(ConstantPruningModifier):
            key = (id(m), m.start_epoch)
            if epoch + _EPS >= m.start_epoch and key not in self._done:
                names = [n for n, _ in select_params(self.model, m.params)]
                for n, mask in MaskSet.from_zeros(self.model, names).masks.items():
                    if n not in self.masks:
                        self.masks.update(n, mask)
                self._done.add(key)
        for e, i, target in self.due(epoch):
            m = self.recipe.modifiers[i]
            grads = m.needs_gradients
            if grads and (grad_data is None or loss_fn is None):
                raise ValueError(
                    f"{m.method} pruning needs grad_data and loss_fn at each pruning step"
                )
            settings = m.engine_settings()
            if isinstance(m, GlobalMagnitudePruningModifier):
                settings["global_sparsity"] = True
            report = prune(
                self.model,
                grad_data if grads else [],
                loss_fn=loss_fn or (lambda *_: None),
                sparsity=target,
                masks=self.masks,
                progress=progress,
                **settings,
            )
            self._mark_done(i, e)
            entry = {"epoch": e, "modifier": type(m).__name__, **report.to_dict()}
            self.history.append(entry)
            taken.append(entry)
            log.info(
                "pruned at epoch %.2f to %.3f (%s)", e, report.global_sparsity, entry["modifier"]
            )
        for i, m in enumerate(self.recipe.modifiers):
            if (
                isinstance(m, _Pruning)
                and not m.leave_enabled
                and m.end_epoch != -1
                and epoch > m.end_epoch + _EPS
                and i not in self._released
            ):
                self.masks.release([n for n, _ in select_params(self.model, m.params)])
                self._released.add(i)
        if taken or self.masks.masks:
            self.masks.apply(self.model)
        if optimizer is not None:
            lr = self.lr_at(epoch)
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr
        return taken

    def lr_at(self, epoch: float) -> float | None:
        """Learning rate from the recipe's ``LearningRateFunctionModifier`` s (None: no override)."""
        for m in self.recipe.of(LearningRateFunctionModifier):
            end = m.end_epoch if m.end_epoch != -1 else float("inf")
            if m.start_epoch - _EPS <= epoch <= end + _EPS:
                if m.lr_func == "linear":
                    span = end - m.start_epoch
                    x = 0.0 if span in (0, float("inf")) else (epoch - m.start_epoch) / span
                else:  # cyclic_linear: linear from init_lr to final_lr in every cycle
                    x = ((epoch - m.start_epoch) % m.cycle_epochs) / m.cycle_epochs
                return m.init_lr + (m.final_lr - m.init_lr) * min(1.0, max(0.0, x))
        return None

    def distillation_at(self, epoch: float) -> DistillationModifier | None:
        for m in self.recipe.of(DistillationModifier):
            end = m.end_epoch if m.end_epoch != -1 else float("inf")
            if m.start_epoch - _EPS <= epoch <= end + _EPS:
                return m
        return None

    def optimizer_spec(self) -> tuple[str, dict] | None:
        mods = self.recipe.of(OptimizerModifier)
        return (mods[0].name, dict(mods[0].kwargs)) if mods else None

    @property
    def pruned_param_names(self) -> list[str]:
        names: list[str] = []
        for m in self.recipe.of(_Pruning, ConstantPruningModifier):
            names += [n for n, _ in select_params(self.model, m.params) if n not in names]
        return names

    def sparsity(self) -> float:
        params = dict(self.model.named_parameters())
        names = self.pruned_param_names
        total = sum(params[n].numel() for n in names)
        zeros = sum(int((params[n] == 0).sum()) for n in names)
        return zeros / total if total else 0.0


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, batch-mean (the usual soft-target loss)."""
    t = temperature
    return (
        torch.nn.functional.kl_div(
            torch.log_softmax(student_logits / t, dim=-1),
            torch.log_softmax(teacher_logits / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


__all__ = ["RecipeManager", "distillation_loss"]
