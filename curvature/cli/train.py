"""The ``curvature train`` job: fine-tune a model on a task with a chosen optimizer and evaluate it.

The same Hugging Face ``Trainer`` loop serves every optimizer (:class:`~curvature.integrations.hf.RecipeTrainer`
does AdaHessian's ``create_graph`` backward and feeds MKOR-H its losses), so differences between
runs come from the optimizer alone. Optionally the task's validation metrics are measured every
``eval_every`` steps, which gives the learning curve and the steps needed to reach a target.
Output is written atomically like the prune job's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from curvature.cli.config import DataConfig, at_least, load_for_job, training_args
from curvature.cli.outputs import JobError, atomic_output, check_output


@dataclass(kw_only=True)
class TrainJob(DataConfig):
    optimizer: str = "adamw"
    output: str | None = "runs/train"  # None: do not save the model (benchmarks)
    lr: float | None = None  # None: the optimizer's registered fine-tuning default
    optimizer_kwargs: dict | None = None  # merged over its registered default keywords
    epochs: float = 1.0
    max_steps: int | None = None
    eval_every: int | None = None
    overwrite: bool = False

    def check(self) -> None:
        super().check()
        if self.lr is not None:
            at_least("lr", self.lr, 0, what="learning rate")
        at_least("epochs", self.epochs, 0)
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise JobError(f"--max-steps must be an integer >= 1, got {self.max_steps!r}")
        if self.eval_every is not None and (
            not isinstance(self.eval_every, int) or self.eval_every < 1
        ):
            raise JobError(
                f"--eval-every must be a positive number of steps, got {self.eval_every}"
            )

    def resolved(self) -> tuple[float, dict]:
        """The learning rate and the checked keywords (defaults under the user's)."""
        row = self.row()
        kwargs = {**row.defaults, **(self.optimizer_kwargs or {})}
        try:
            kwargs = row.check(kwargs)
        except ValueError as exc:
            raise JobError(f"--opt: {exc}") from None
        return (self.lr if self.lr is not None else row.lr), kwargs

    def row(self):
        from curvature.optim import registry

        try:
            return registry.get(self.optimizer)
        except ValueError as exc:
            raise JobError(f"--{exc}") from None


class EvalEvery(TrainerCallback):
    """Evaluate every ``every`` optimizer steps; append ``{step, seconds, **metrics}``."""

    def __init__(self, evaluate, every: int):
        self.evaluate, self.every = evaluate, every
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self._t = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.train_seconds += time.perf_counter() - self._t
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            ev = {k: v for k, v in self.evaluate(model).items() if k != "units"}
            self.history.append({"step": state.global_step, "seconds": self.train_seconds, **ev})


def steps_to_reach(
    history: list[dict], target: float, metric: str = "accuracy", higher_is_better: bool = True
) -> int | None:
    """First evaluated step whose ``metric`` reaches ``target``: at least it, or at most it for a
    metric where lower is better (perplexity); None if never."""
    sign = 1 if higher_is_better else -1
    return next((h["step"] for h in history if sign * (h[metric] - target) >= 0), None)


def run_train(job: TrainJob) -> dict:
    from curvature.cli.utils import peak_memory_bytes, reset_peak_memory
    from curvature.integrations.hf import RecipeTrainer
    from curvature.tasks.kinds import check_task

    check_task(job.task)
    job.check()
    import os

    if not job.row().data_parallel and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise JobError(
            f"--optimizer {job.optimizer} under torchrun: the Trainer wraps the model in "
            "DistributedDataParallel, whose reducer has no double backward; run it in one process, "
            "or in your own loop without DDP (the optimizer then averages across ranks itself)"
        )
    lr, kwargs = job.resolved()
    out = Path(job.output) if job.output else None
    if out is not None:
        check_output(out, job.overwrite)
    p = load_for_job(job)
    model, tokenizer = p.model, p.tokenizer

    start = time.perf_counter()
    output = (
        atomic_output(out, private=job.private_outputs)
        if out
        else tempfile.TemporaryDirectory(prefix="curvature-train-")
    )
    with output as tmp:
        args = training_args(
            job,
            Path(tmp) / "trainer",
            num_train_epochs=job.epochs,
            max_steps=job.max_steps if job.max_steps else -1,
            learning_rate=lr,
            lr_scheduler_type="linear",
            logging_strategy="no",
        )
        trainer = RecipeTrainer(
            model=model,
            args=args,
            train_dataset=p.train,
            data_collator=p.collator,
            optimizer_name=job.optimizer,
            optimizer_kwargs=kwargs,
        )
        curve = EvalEvery(p.evaluate, job.eval_every or 10**9)
        trainer.add_callback(curve)
        reset_peak_memory()
        result = trainer.train()
        steps = result.global_step
        final = p.evaluate(model, progress=job.progress, desc="eval")
        final.pop("units", None)
        metrics = {
            "optimizer": job.optimizer.lower(),
            "optimizer_class": type(trainer._inner_optimizer()).__name__,
            "lr": lr,
            "optimizer_kwargs": kwargs,
            "model": str(job.model),
            "data": job.data,
            "task": p.task,
            "metric": p.metric,
            "seed": job.seed,
            "steps": steps,
            "batch_size": job.batch_size,
            "epochs": job.epochs,
            "max_steps": job.max_steps,
            "max_length": job.max_length,
            "max_train": job.max_train,
            "max_eval": job.max_eval,
            **p.info,
            "train_loss": result.training_loss,
            "train_seconds": curve.train_seconds,
            "seconds_per_step": curve.train_seconds / max(steps, 1),
            "peak_memory_bytes": peak_memory_bytes(),
            "validation": final,
            "curve": curve.history,
            "seconds": time.perf_counter() - start,
        }
        inner = trainer._inner_optimizer()
        if getattr(inner, "hybrid", False):  # MKOR-H: whether and when it switched
            metrics["switched_to_base_at_step"] = inner.switched_at_step
        if out is not None:
            shutil.rmtree(Path(tmp) / "trainer", ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
