"""Hugging Face integration: a ``TrainerCallback`` that applies a recipe, and a thin ``Trainer``.

``RecipeCallback`` works with any ``transformers.Trainer``: it prunes at the recipe's points
(collecting Fisher gradients from the training data), keeps the masks enforced after every
optimizer step, and sets the recipe's learning rate. Distillation changes the loss, which a
callback cannot do, so :class:`RecipeTrainer` adds it in ``compute_loss``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from curvature.pruning.masks import unwrap_optimizer
from curvature.recipes.manager import RecipeManager, distillation_loss

log = logging.getLogger(__name__)


def model_loss(model, batch):
    """Loss of a Hugging Face model on a batch that includes ``labels``."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def grad_loader(dataset, batch_size: int, collator, seed: int) -> DataLoader:
    """Shuffled batches for the Fisher gradients; under ``torch.distributed`` this rank's shard
    (a ``DistributedSampler`` seeded alike on every rank), so the ranks split the gradients."""
    from curvature.core.parallel import world

    if world()[1] > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=collator, generator=gen
    )


class RecipeCallback(TrainerCallback):
    """Apply a :class:`RecipeManager` during ``Trainer.train()``.

    Args:
        manager: the recipe state for the trained model.
        grad_dataset: dataset for the Fisher gradients (usually the training set).
        collator: the data collator used to batch ``grad_dataset``.
        grad_batch_size: batch size of one Fisher gradient (the recipe's
            ``grad_sampler_kwargs.batch_size`` overrides it).
        before_first_prune: called with the model right before the first pruning step (the CLI
            evaluates the dense accuracy there).
    """

    def __init__(
        self,
        manager: RecipeManager,
        *,
        grad_dataset=None,
        collator=None,
        grad_batch_size: int = 16,
        before_first_prune=None,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        self.manager = manager
        self.grad_dataset = grad_dataset
        self.collator = collator
        self.grad_batch_size = grad_batch_size
        self.before_first_prune = before_first_prune
        self.progress = progress
        self.seed = seed
        self.optimizer = None
        # hooks for state that lives outside the manager (RecipeTrainer: the "self" teacher)
        self.on_checkpoint = None
        self.on_resume = None
        self.resume_dir = None  # the checkpoint being resumed, when the trainer knows it

    def _grad_loader(self, batch_size):
        if self.grad_dataset is None:
            return None
        return grad_loader(self.grad_dataset, batch_size, self.collator, self.seed)

    STATE_FILE = "recipe_state.pt"

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = optimizer
        if state.global_step > 0:  # resumed from a checkpoint: restore the recipe's state too
            folder = self.resume_dir or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path = Path(folder) / self.STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the checkpoint was not written with a RecipeCallback, "
                    "so the pruning masks and schedule cannot be resumed"
                )
            saved = torch.load(path, weights_only=False)
            self.manager.load_state_dict(saved["manager"])
            if self.on_resume is not None:
                self.on_resume(saved)
            log.info(
                "recipe state restored from %s (%d pruning steps done)",
                path,
                len(self.manager.history),
            )
        self.manager.masks.attach(model, optimizer)

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            extra = self.on_checkpoint() if self.on_checkpoint is not None else {}
            torch.save({"manager": self.manager.state_dict(), **extra}, folder / self.STATE_FILE)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._apply(state.epoch or 0.0, model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # the Trainer's scheduler has just written its own rate into the optimizer: put the
        # recipe's back, so that what is logged after this step is the rate the recipe applies
        if optimizer is not None:
            self.manager.apply_rates(optimizer, state.epoch or 0.0)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # the points due at the epoch reached (the end of the schedule after a full run; an
        # interrupted run does not jump ahead to it)
        self._apply(float(state.epoch or 0.0), model, optimizer)
        self.manager.masks.apply(model)

    def _apply(self, epoch, model, optimizer):
        due = self.manager.due(epoch)
        if due and not self.manager.history and self.before_first_prune is not None:
            self.before_first_prune(model)
        batch_size = self.grad_batch_size
        for _, i, _ in due:
            kw = getattr(self.manager.recipe.modifiers[i], "grad_sampler_kwargs", {}) or {}
            batch_size = kw.get("batch_size", batch_size)
        taken = self.manager.step(
            epoch,
            grad_data=self._grad_loader(batch_size),
            loss_fn=model_loss,
            optimizer=optimizer,
            progress=self.progress,
        )
        if taken:
            # the pruning step replaced weights in place; re-arm the hooks on the same tensors
            self.manager.masks.attach(model, optimizer)


def _first_share(inputs: dict, share: float) -> dict:
    """The first ``ceil(share * batch)`` examples of a batch of tensors (at least one)."""
    import math

    sizes = {v.shape[0] for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"hessian_batch: the batch's tensors have different lengths {sizes}")
    n = max(1, math.ceil(share * sizes.pop()))
    return {k: v[:n] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in inputs.items()}


class RecipeTrainer(Trainer):
    """A ``Trainer`` with the recipe's distillation loss and, optionally, a curvature optimizer.

    ``teacher`` is a model, or ``"self"``: a frozen copy of the student taken right before the
    first pruning step (the dense fine-tuned model), useful when no separate teacher exists.

    ``optimizer_name`` / ``optimizer_kwargs`` (or the recipe's ``!OptimizerModifier``) choose the
    optimizer through :func:`curvature.optim.build_optimizer`. For AdaHessian the backward runs
    with ``create_graph=True`` and gradient clipping is turned off (clipping in place would corrupt
    the gradient's graph); for MKOR-H every training loss is passed to ``observe_loss``.
    """

    def __init__(
        self,
        *args,
        manager: RecipeManager | None = None,
        teacher=None,
        optimizer_name: str | None = None,
        optimizer_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # compute_loss below returns the mean loss of the micro-batch (it does not use
        # num_items_in_batch): the Trainer must divide it by the accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self.manager = manager
        self.teacher = teacher
        self._self_teacher = False
        self.extra_state: dict = {}  # small job state saved with the checkpoints (metrics)
        for cb in self.callback_handler.callbacks:  # callbacks given to the constructor
            self._wire(cb)
        spec = manager.optimizer_spec() if manager is not None else None
        self.optimizer_name = optimizer_name or (spec[0] if spec else None)
        self.optimizer_kwargs = dict(optimizer_kwargs or (spec[1] if spec else {}))
        from curvature.optim.registry import get as optimizer_row

        if self.optimizer_name and optimizer_row(self.optimizer_name).differentiates_gradient:
            if self.args.max_grad_norm:
                log.info(
                    "%s: gradient clipping turned off for this trainer (max_grad_norm "
                    "%s -> 0): clipping in place would corrupt the gradient's graph",
                    self.optimizer_name,
                    self.args.max_grad_norm,
                )
            self.args = copy.copy(self.args)  # the caller's TrainingArguments stay as they were
            self.args.max_grad_norm = 0.0

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, (str, Path)):
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, RecipeCallback):
                    cb.resume_dir = Path(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _wire(self, callback) -> None:
        if isinstance(callback, RecipeCallback):
            callback.on_checkpoint = self._checkpoint_state
            callback.on_resume = self._resume_state

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None and self.optimizer_name:
            from curvature.optim import build_optimizer

            self.optimizer = build_optimizer(
                self.optimizer_name, self.model, lr=self.args.learning_rate, **self.optimizer_kwargs
            )
            return self.optimizer
        return super().create_optimizer(*args, **kwargs)

    def _inner_optimizer(self):
        return unwrap_optimizer(self.optimizer)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Log the learning rate the optimizer actually applies: a recipe's learning-rate
        modifier sets it directly each step, past the Trainer's own scheduler."""
        if "learning_rate" in logs and self.optimizer is not None:
            groups = getattr(self._inner_optimizer(), "param_groups", None)
            if groups:
                logs = {**logs, "learning_rate": float(groups[0]["lr"])}
        super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        from curvature.optim import MKOR, needs_create_graph

        inner = self._inner_optimizer()
        if getattr(inner, "needs_hessian_closure", False):  # AdaHessian on a sub-batch
            sub = _first_share(self._prepare_inputs(inputs), inner.hessian_batch)
            inner.set_hessian_closure(lambda: self.compute_loss(model, sub))
        if not needs_create_graph(inner):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if isinstance(inner, MKOR):
                inner.observe_loss(loss)
            return loss
        model.train()
        inputs = self._prepare_inputs(inputs)
        loss = self.compute_loss(model, inputs)
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        steps = steps or self.args.gradient_accumulation_steps
        if steps > 1:  # as the Trainer's own step divides (see __init__)
            loss = loss / steps
        loss.backward(create_graph=True)
        return loss.detach()

    def add_callback(self, callback):
        """Add a callback; a :class:`RecipeCallback` also checkpoints this trainer's "self"
        teacher (and ``extra_state``), so a resumed run distills from the same dense model."""
        self._wire(callback)
        return super().add_callback(callback)

    def _checkpoint_state(self) -> dict:
        out = {"extra": dict(self.extra_state)}
        if self._self_teacher and isinstance(self.teacher, torch.nn.Module):
            out["teacher"] = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        return out

    def _resume_state(self, saved: dict) -> None:
        self.extra_state.update(saved.get("extra", {}))
        if self.teacher == "self" and "teacher" not in saved and self.manager is not None:
            if self.manager.history:  # pruned before the checkpoint: the dense copy is gone
                raise ValueError(
                    "the checkpoint holds no 'self' teacher (it was saved without RecipeTrainer's "
                    "state): distillation from the dense model cannot resume"
                )
        if "teacher" in saved and self.teacher == "self":
            self.teacher = copy.deepcopy(self.model).eval()
            self.teacher.load_state_dict(saved["teacher"])
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self._self_teacher = True

    def snapshot_teacher(self, model) -> None:
        if self.teacher == "self":
            self._self_teacher = True
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        outputs = model(**inputs)
        loss = outputs.loss
        epoch = self.state.epoch or 0.0
        mod = self.manager.distillation_at(epoch) if self.manager is not None else None
        if mod is not None and isinstance(self.teacher, torch.nn.Module):
            with torch.no_grad():
                t_out = self.teacher(**inputs)
            soft = sum(
                distillation_loss(outputs[k], t_out[k], mod.temperature)
                for k in mod.distill_output_keys
            ) / len(mod.distill_output_keys)
            loss = (1.0 - mod.hardness) * loss + mod.hardness * soft
        return (loss, outputs) if return_outputs else loss
