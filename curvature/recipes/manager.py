"""Apply a recipe during training: pruning schedules, masks, learning rate, distillation.

The manager is framework-free: a plain PyTorch loop calls :meth:`RecipeManager.step` with the
current (fractional) epoch; the Hugging Face callback in :mod:`curvature.integrations.hf` does the same.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Iterable

import torch

from curvature.pruning import MaskSet, prune
from curvature.pruning.masks import check_param_fits, parse_mask
from curvature.pruning.params import select_params
from curvature.recipes.loader import Recipe
from curvature.recipes.schema import (
    ConstantPruningModifier,
    DistillationModifier,
    GPTQModifier,
    LearningRateFunctionModifier,
    OptimizerModifier,
    SetLearningRateModifier,
    SetWeightDecayModifier,
    StructureModifier,
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
        # applied pruning points (modifier index, epoch); ("constant" | "weight_decay", index)
        self._done: set[tuple] = set()
        self._released: set[int] = set()
        # gradual structure removal: the final fractions (set by a speed-up plan, else the
        # modifier's own), the dense counts, the structures as last traced, the steps taken
        self.structure_targets: dict | None = None
        self.structure_dense: dict | None = None
        self.structure_groups: list | None = None
        self.structure_steps: list[dict] = []
        self._check_against_model()

    def _check_against_model(self) -> None:
        """Everything the recipe says about this model, checked before any training: parameter
        names and patterns match, and every pruned parameter fits its modifier's mask."""
        for m in self.recipe.of(ConstantPruningModifier):
            select_params(self.model, m.params)
        for m in self.recipe.of(GPTQModifier):  # the quantized weights exist and fit the grid
            try:
                from curvature.pruning.layerwise import layer_targets

                for t in layer_targets(self.model, m.weights(self.model)):
                    m.part().grid().check_layer(t.cols, t.name)
            except ValueError as exc:
                raise ValueError(f"line {m.line}: GPTQModifier: {exc}") from None
        for m in self.recipe.of(StructureModifier):
            for other in self.recipe.of(_Pruning, ConstantPruningModifier):
                if m.gradual and other.start_epoch < m.end_epoch - _EPS:
                    raise ValueError(
                        f"line {other.line}: {type(other).__name__} starts at epoch "
                        f"{other.start_epoch:g}, before the gradual structure removal ends "
                        f"(end_epoch {m.end_epoch:g}): its masks cannot follow matrices that "
                        f"shrink; start it at {m.end_epoch:g} or later"
                    )
        for m in self.recipe.of(_Pruning):
            structure = parse_mask(m.mask_type)
            for patterns in m.finals().values():
                try:
                    for name, p in select_params(self.model, patterns):
                        check_param_fits(name, p, structure)
                except ValueError as exc:
                    where = f"line {m.line}: " if m.line else ""
                    raise ValueError(f"{where}{type(m).__name__}: {exc}") from None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to resume: masks, applied points, released modifiers, history."""
        return {
            "masks": self.masks.state_dict(),
            "done": sorted(self._done, key=repr),
            "released": sorted(self._released),
            "history": [dict(h) for h in self.history],
            "structure_steps": [dict(h) for h in self.structure_steps],
            "num_modifiers": len(self.recipe.modifiers),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_modifiers") != len(self.recipe.modifiers):
            raise ValueError(
                f"the saved recipe state has {state.get('num_modifiers')} modifiers, this recipe "
                f"{len(self.recipe.modifiers)}: resume with the recipe the run started with"
            )
        params = dict(self.model.named_parameters())
        self.masks.load_state_dict(
            {n: m.to(params[n].device) if n in params else m for n, m in state["masks"].items()}
        )
        self._done = {tuple(k) for k in state["done"]}
        self._released = set(state["released"])
        self.history = [dict(h) for h in state["history"]]
        self.structure_steps = [dict(h) for h in state.get("structure_steps", [])]

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

    def check_outputs(self, output_keys) -> None:
        """Refuse distillation of outputs the model does not produce (before any training)."""
        keys = list(output_keys)
        for m in self.recipe.of(DistillationModifier):
            for key in m.distill_output_keys:
                if key not in keys:
                    near = difflib.get_close_matches(key, keys, n=1)
                    hint = f"; did you mean {near[0]!r}?" if near else ""
                    where = f"line {m.line}: " if m.line else ""
                    raise ValueError(
                        f"{where}DistillationModifier: distill_output_keys {key!r} is not an "
                        f"output of the model (its outputs: {', '.join(keys)}){hint}"
                    )

    def _targets(self, m: _Pruning, epoch: float) -> float | dict[str, float]:
        """The target at ``epoch``: one sparsity, or ``{parameter: sparsity}`` for a modifier
        whose ``final_sparsity`` maps sparsities to parameters."""
        x = next(p for e, p in m.progress() if abs(e - epoch) <= _EPS)
        finals = m.finals()
        if len(finals) == 1 and not isinstance(m.final_sparsity, dict):
            return m.target_at(x, next(iter(finals)))
        out = {}
        for final, patterns in finals.items():
            for name, _ in select_params(self.model, patterns):
                out[name] = m.target_at(x, final)
        return out

    def _last_target(self, index: int) -> float:
        """The target of the modifier's last applied point (what a num_grads schedule reads:
        the scheduled value, not the reached one, which rounding can leave just below it)."""
        done = [h["target_sparsity"] for h in self.history if h.get("index") == index]
        return done[-1] if done else 0.0

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
        taken = self._structures(epoch, grad_data, loss_fn, optimizer, progress)
        for m in self.recipe.of(ConstantPruningModifier):
            key = ("constant", self.recipe.modifiers.index(m))
            if epoch + _EPS >= m.start_epoch and key not in self._done:
                names = [n for n, _ in select_params(self.model, m.params)]
                for n, mask in MaskSet.from_zeros(self.model, names).masks.items():
                    if n not in self.masks:
                        self.masks.update(n, mask)
                self._done.add(key)
        for e, i, _target in self.due(epoch):
            m = self.recipe.modifiers[i]
            grads = m.needs_data
            if grads and (grad_data is None or loss_fn is None):
                raise ValueError(
                    f"{m.method} pruning needs grad_data and loss_fn at each pruning step "
                    "(gradients, or calibration inputs for the layer-wise methods)"
                )
            settings = m.engine_settings(reached=self._last_target(i))
            sparsity = self._targets(m, e)
            if isinstance(sparsity, dict):
                settings.pop("params")
            report = prune(
                self.model,
                grad_data if grads else [],
                loss_fn=loss_fn or (lambda *_: None),
                sparsity=sparsity,
                masks=self.masks,
                progress=progress,
                **settings,
            )
            self._mark_done(i, e)
            entry = {"epoch": e, "index": i, "modifier": type(m).__name__, **report.to_dict()}
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
                self.masks.release(self._names_of(m))
                self._released.add(i)
        if taken or self.masks.masks:
            self.masks.apply(self.model)
        if optimizer is not None:
            self.apply_rates(optimizer, epoch)
            for m in self.recipe.of(SetWeightDecayModifier):
                key = ("weight_decay", self.recipe.modifiers.index(m))
                if epoch + _EPS >= m.start_epoch and key not in self._done:
                    groups = optimizer.param_groups
                    chosen = m.param_groups if m.param_groups is not None else range(len(groups))
                    for gi in _checked_groups(m, chosen, len(groups)):
                        groups[gi]["weight_decay"] = m.weight_decay
                    self._done.add(key)
        return taken

    def structures_removed(self) -> None:
        """Mark every step of the structure modifiers done (they were removed at once)."""
        for i, m in enumerate(self.recipe.modifiers):
            if isinstance(m, StructureModifier):
                self._done.update(("structures", i, e) for e, _ in m.progress())

    def _structures(self, epoch, grad_data, loss_fn, optimizer, progress) -> list[dict]:
        """The gradual structure removal's step due at ``epoch`` (the latest, when training
        steps are coarser than its schedule): each block brought to the share of its target the
        schedule reaches, by the modifier's method on batches of ``grad_data``; the optimizer
        then trains the smaller parameters with the moments of what remains."""
        from curvature.pruning import structured, structures

        taken = []
        for i, m in enumerate(self.recipe.modifiers):
            if not isinstance(m, StructureModifier) or not m.gradual:
                continue
            due = [
                (e, x)
                for e, x in m.progress()
                if e <= epoch + _EPS and ("structures", i, e) not in self._done
            ]
            if not due:
                continue
            if grad_data is None or loss_fn is None:
                raise ValueError(
                    "gradual structure removal needs grad_data and loss_fn (calibration "
                    "batches) at each step"
                )
            final = self.structure_targets
            if final is None:
                if m.speedup is not None:
                    raise ValueError(
                        "a gradual removal to a speedup needs the sizes planned first "
                        "(curvature prune does it; in Python set manager.structure_targets)"
                    )
                final = m.targets()
            kinds = tuple(final)
            if self.structure_dense is None:
                self.structure_dense = structured.count(self.model, grad_data, loss_fn, kinds)
            current = (
                structures.sizes(self.structure_groups)
                if self.structure_groups is not None
                else self.structure_dense
            )
            e, x = due[-1]
            for d, _ in due:
                self._done.add(("structures", i, d))
            targets = structured.gradual_targets(final, self.structure_dense, current, x)
            if not targets:
                continue
            with structures.recording() as replaced:
                report = structured.run(
                    self.model, grad_data, loss_fn, targets, m.chooser(), progress
                )
            if optimizer is not None:
                structures.follow(optimizer, replaced)
            self.structure_groups = report.groups
            entry = {
                "epoch": e, "index": i, "modifier": "StructureModifier", "progress": x,
                "sizes": report.sizes, "params_after": report.params_after,
                "seconds": report.seconds, "estimated_error": report.estimated_error,
            }  # fmt: skip
            self.structure_steps.append(entry)
            taken.append(entry)
            log.info("structures at epoch %.2f: %s", e, report.sizes)
        return taken

    def apply_rates(self, optimizer, epoch: float) -> None:
        """Set each parameter group's learning rate to the recipe's at ``epoch`` (groups a
        learning-rate function's ``param_groups`` leaves out keep their rate)."""
        groups = optimizer.param_groups
        for m in self.recipe.of(LearningRateFunctionModifier):
            if m.param_groups is not None:
                _checked_groups(m, m.param_groups, len(groups))
        for i, group in enumerate(groups):
            lr = self.lr_at(epoch, group=i)
            if lr is not None:
                group["lr"] = lr

    def lr_at(self, epoch: float, group: int | None = None) -> float | None:
        """Learning rate from the recipe (None: no override) for parameter group ``group`` (None:
        any group): an active ``LearningRateFunctionModifier`` whose ``param_groups`` hold the
        group, else the latest ``SetLearningRateModifier`` started. A function with
        ``update_frequency > 0`` changes the rate every that many epochs (a staircase from its
        start), with -1 (the default) at every step."""
        for m in self.recipe.of(LearningRateFunctionModifier):
            if group is not None and m.param_groups is not None and group not in m.param_groups:
                continue
            end = m.end_epoch if m.end_epoch != -1 else float("inf")
            if m.start_epoch - _EPS <= epoch <= end + _EPS:
                at = epoch
                if m.update_frequency > 0:
                    k = math.floor((epoch - m.start_epoch) / m.update_frequency + _EPS)
                    at = m.start_epoch + k * m.update_frequency
                if m.lr_func == "linear":
                    span = end - m.start_epoch
                    x = 0.0 if span in (0, float("inf")) else (at - m.start_epoch) / span
                else:  # cyclic_linear: linear from init_lr to final_lr in every cycle
                    x = ((at - m.start_epoch) % m.cycle_epochs) / m.cycle_epochs
                return m.init_lr + (m.final_lr - m.init_lr) * min(1.0, max(0.0, x))
        started = [
            m for m in self.recipe.of(SetLearningRateModifier) if m.start_epoch <= epoch + _EPS
        ]
        if started:
            return max(started, key=lambda m: m.start_epoch).learning_rate
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
            names += [n for n in self._names_of(m) if n not in names]
        return names

    def _names_of(self, m) -> list[str]:
        """Parameter names a pruning or constant modifier applies to."""
        groups = m.finals().values() if isinstance(m, _Pruning) else [m.params]
        return [n for patterns in groups for n, _ in select_params(self.model, patterns)]

    def sparsity(self) -> float:
        params = dict(self.model.named_parameters())
        names = self.pruned_param_names
        total = sum(params[n].numel() for n in names)
        zeros = sum(int((params[n] == 0).sum()) for n in names)
        return zeros / total if total else 0.0


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, batch-mean (the usual soft-target loss).

    Logits with more than two dimensions (a language model's ``[batch, tokens, vocabulary]``) are
    one distribution per position: the mean is over positions, so the loss does not grow with
    the sequence length (question answering's ``start_logits`` are one distribution over the
    positions of each example, and stay as they are)."""
    t = temperature
    if student_logits.dim() > 2:
        student_logits = student_logits.reshape(-1, student_logits.shape[-1])
        teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1])
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


def _checked_groups(modifier, chosen, count: int):
    """``chosen`` parameter-group indices, each checked against the optimizer's ``count``."""
    bad = [g for g in chosen if not 0 <= g < count]
    if bad:
        where = f"line {modifier.line}: " if modifier.line else ""
        raise ValueError(
            f"{where}{type(modifier).__name__}: param_groups {bad} do not exist; the optimizer "
            f"has {count} parameter group(s) (0 to {count - 1})"
        )
    return chosen
