"""The ``curvature prune`` job: fine-tune and prune a Hugging Face model per a recipe, on any task
of :mod:`curvature.tasks.kinds` (classification, question answering, masked or causal LM).

Everything that can be checked is checked before work starts (recipe, data, model, parameter
names, output folder). Output is written to a temporary folder beside the target and renamed into
place only when the job succeeds, so a failed run never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from curvature.recipes import Recipe


class JobError(ValueError):
    """A user-facing job failure with a message that says what to change."""


@dataclass
class PruneJob:
    recipe: str | Recipe  # a recipe file, or an already validated Recipe
    model: str = "default"
    data: str = "bbc-news"
    output: str = "runs/pruned"
    oneshot: bool = False
    max_train: int | None = None
    max_eval: int | None = None
    max_length: int = 128
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 5e-5
    seed: int = 0
    teacher: str | None = None
    overrides: dict = field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True
    threads: int | None = None
    optimizer: str | None = None  # overrides the recipe's !OptimizerModifier
    optimizer_kwargs: dict | None = None
    checkpoint_every: int | None = None  # save a resumable checkpoint every N training steps
    resume: bool = False  # continue from the latest checkpoint of an interrupted run
    dense_baseline: bool = False  # also train the dense model for the same steps (no pruning)
    task: str | None = None  # None: inferred from the data and the model
    doc_stride: int | None = None  # question answering: window overlap (None: max_length // 3)
    eval_split: str | None = None  # hub data: the split to evaluate on
    eval_data: str | None = None  # a separate validation file
    eval_stride: int | None = None  # causal LM: the evaluation window's stride
    compressed: bool = False  # also write the bitmask checkpoint to OUTPUT/compressed


def checkpoint_dir(output: str | Path) -> Path:
    """Where a prune job keeps its resumable checkpoints (beside the output, removed on success)."""
    out = Path(output)
    return out.parent / f".{out.name}.checkpoints"


def latest_checkpoint(output: str | Path) -> Path:
    folder = checkpoint_dir(output)
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not found:
        raise JobError(
            f"--resume: no checkpoint in {folder}; an interrupted run leaves one there when it "
            "was started with --checkpoint-every N"
        )
    return found[-1]


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise JobError(
            f"output {path} already exists and is not empty; choose another folder or pass --overwrite"
        )


# partial output folders being written by this process (removed on SIGTERM by the CLI)
_PARTIAL: set[Path] = set()


def remove_partial_outputs() -> list[Path]:
    """Remove every partial output folder this process is writing; return them."""
    removed = sorted(_PARTIAL)
    for tmp in removed:
        shutil.rmtree(tmp, ignore_errors=True)
    _PARTIAL.clear()
    return removed


#: set while a rank other than 0 runs in its own scratch folder (the sweep): its jobs then write
#: normally there, since later steps read their outputs back
PRIVATE_OUTPUTS = False


def _rank() -> int:
    from curvature.core.parallel import world

    return world()[0]


@contextlib.contextmanager
def _atomic_output(out: Path):
    """Yield a temporary folder beside ``out``; it replaces ``out`` only if the block succeeds.

    On any exception (an error or Ctrl-C) the temporary folder is removed; on SIGTERM the CLI's
    handler removes it (:func:`remove_partial_outputs`) before exiting. A process killed outright cannot clean up: the next run names what it
    left (``.NAME.partial-*``) in a warning. The result gets the permissions of the user's umask
    (a temporary folder is created owner-only).
    """
    if _rank() != 0 and not PRIVATE_OUTPUTS:  # under torch.distributed only rank 0 writes: the
        # others work in a scratch folder (unless their outputs are private, see the sweep)
        tmp = Path(tempfile.mkdtemp(prefix="curvature-rank-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(out.parent.glob(f".{out.name}.partial-*"))
    if leftovers:
        warnings.warn(
            f"{len(leftovers)} partial output folder(s) of an interrupted run remain: "
            f"{', '.join(str(p) for p in leftovers)}; remove them if no other run is writing "
            f"{out}",
            stacklevel=3,
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    _PARTIAL.add(tmp)
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _PARTIAL.discard(tmp)


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes the user's umask gives new files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):
                os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _recipe_trainer(job, manager, train, collator, epochs, output_dir, logging, teacher=None):
    """The Trainer of a prune job (and of its dense baseline): the recipe's rate when it sets
    one (a constant scheduler the recipe overrides), else a linear decay from ``job.lr``."""
    from curvature.integrations.hf import RecipeTrainer

    args = training_args(
        job,
        output_dir,
        num_train_epochs=epochs,
        learning_rate=job.lr,
        lr_scheduler_type="constant" if manager.lr_at(0.0) is not None else "linear",
        logging_strategy=logging,
    )
    return RecipeTrainer(
        model=manager.model,
        args=args,
        train_dataset=train,
        data_collator=collator,
        manager=manager,
        teacher=teacher,
        optimizer_name=job.optimizer,
        optimizer_kwargs=job.optimizer_kwargs,
    )


def _dense_baseline(job, recipe: Recipe, epochs: float, work: Path) -> dict:
    """The dense model trained for the same steps as the pruned run: the same recipe without its
    pruning and distillation modifiers (learning-rate and epoch modifiers kept), the same seed,
    data order, batch size and optimizer; its validation metrics, and the steps.
    ``work`` (inside the job's partial output, so removed with it) holds the Trainer's files."""
    from curvature.integrations.hf import RecipeCallback
    from curvature.recipes import RecipeManager
    from curvature.recipes.schema import DistillationModifier, _Pruning

    dense_recipe = Recipe(
        modifiers=[
            m for m in recipe.modifiers if not isinstance(m, (_Pruning, DistillationModifier))
        ],
        variables=recipe.variables,
        source=recipe.source,
    )
    p = load_for_job(job)
    model = p.model
    manager = RecipeManager(dense_recipe, model)
    trainer = _recipe_trainer(job, manager, p.train, p.collator, epochs, work, "no")
    trainer.add_callback(RecipeCallback(manager, progress=job.progress, seed=job.seed))
    result = trainer.train()
    shutil.rmtree(work, ignore_errors=True)
    ev = p.evaluate(model, progress=job.progress, desc="eval dense baseline")
    ev.pop("units", None)
    return {**ev, "steps": result.global_step, "epochs": epochs}


def load_for_job(job):
    """Seed, then load the job's task: model, tokenizer, training features, collator, evaluator.

    ``job`` has ``model``, ``data``, ``seed``, ``max_train``, ``max_eval``, ``max_length`` and
    ``progress``, and optionally ``threads``, ``eval_batch_size`` (64), ``task``, ``doc_stride``,
    ``eval_split``, ``eval_data`` and ``eval_stride`` (the prune and train jobs and the sweep's
    configuration). Returns a :class:`curvature.tasks.kinds.Prepared`.
    """
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from curvature.cli.utils import quiet_progress
    from curvature.tasks.kinds import prepare

    if getattr(job, "threads", None):
        torch.set_num_threads(job.threads)
    hf_logging.set_verbosity_error()
    if not job.progress:
        quiet_progress()
    set_seed(job.seed)
    return prepare(
        getattr(job, "task", None),
        job.model,
        job.data,
        seed=job.seed,
        max_train=job.max_train,
        max_eval=job.max_eval,
        max_length=job.max_length,
        eval_batch_size=getattr(job, "eval_batch_size", 64),
        doc_stride=getattr(job, "doc_stride", None),
        eval_split=getattr(job, "eval_split", None),
        eval_data=getattr(job, "eval_data", None),
        stride=getattr(job, "eval_stride", None),
    )


@torch.no_grad()
def _output_keys(model, batch) -> list[str]:
    """Names of the outputs ``model`` returns on ``batch`` (what distillation can read)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    model.train(was)
    return [k for k in out.keys() if k != "loss"]


def training_args(job, output_dir, **kwargs):
    """``TrainingArguments`` shared by the jobs: no checkpoints or reporting, the job's seed,
    batch size and progress switch, the CPU when there is no CUDA device."""
    from transformers import TrainingArguments

    every = getattr(job, "checkpoint_every", None)
    saving = {"save_strategy": "no"}
    if every or getattr(job, "resume", False):
        saving = {"save_strategy": "steps", "save_steps": every or 10**9, "save_total_limit": 1}
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=job.batch_size,
        **saving,
        report_to=[],
        seed=job.seed,
        disable_tqdm=not job.progress,
        use_cpu=not torch.cuda.is_available(),
        **kwargs,
    )


def run_prune(job: PruneJob) -> dict:
    from curvature.integrations.hf import RecipeCallback, model_loss
    from curvature.recipes import RecipeManager, load_recipe
    from curvature.recipes.schema import DistillationModifier
    from curvature.tasks.kinds import check_task

    start = time.perf_counter()
    # validate before anything else
    check_task(job.task)
    recipe = (
        job.recipe if isinstance(job.recipe, Recipe) else load_recipe(job.recipe, job.overrides)
    )
    out = Path(job.output)
    _check_output(out, job.overwrite)
    resume_from = str(latest_checkpoint(out)) if job.resume else None
    if job.checkpoint_every is not None and job.checkpoint_every < 1:
        raise JobError(f"--checkpoint-every must be >= 1, got {job.checkpoint_every}")
    epochs = 0.0 if job.oneshot else recipe.num_epochs
    if job.dense_baseline and epochs <= 0:
        raise JobError(
            "--dense-baseline trains the dense model for the run's steps, and this run has none "
            "(--oneshot, or a recipe without epochs): drop --dense-baseline"
        )
    distill = recipe.of(DistillationModifier)
    teacher = job.teacher or (distill[0].teacher if distill else None)
    _check_teacher(recipe, distill, teacher, epochs, job.teacher)
    p = load_for_job(job)
    model, tokenizer, collator = p.model, p.tokenizer, p.collator
    manager = RecipeManager(recipe, model)  # checks every params entry against this model
    if distill and epochs > 0:
        manager.check_outputs(_output_keys(model, collator([p.train[0]])))

    with _atomic_output(out) as tmp:
        metrics: dict = {"recipe": recipe.source, "model": str(job.model), "data": job.data}
        metrics.update(task=p.task, metric=p.metric, higher_is_better=p.higher_is_better)
        metrics.update(p.info)

        units: dict = {}  # evaluations' units, kept out of metrics.json (predictions/*.csv)

        def record_dense(m):
            metrics["dense"] = p.evaluate(m, progress=job.progress, desc="eval dense")
            units["dense"] = metrics["dense"].pop("units", None)
            if trainer is not None:  # saved with checkpoints, so a resumed run reports the same
                trainer.extra_state["dense"] = metrics["dense"]
                trainer.extra_state["dense_units"] = units["dense"]

        trainer = None

        if epochs <= 0:
            record_dense(model)
            grad_bs = _grad_batch_size(recipe, job.batch_size)
            from curvature.integrations.hf import grad_loader as make_grad_loader

            grad_loader = make_grad_loader(p.train, grad_bs, collator, job.seed)
            manager.step(math.inf, grad_data=grad_loader, loss_fn=model_loss, progress=job.progress)
        else:
            if teacher not in (None, "self"):
                from curvature.tasks.kinds import load_model

                teacher = load_model(p.task, teacher).eval()
            saving = job.checkpoint_every is not None or job.resume
            trainer = _recipe_trainer(
                job,
                manager,
                p.train,
                collator,
                epochs,
                checkpoint_dir(out) if saving else tmp / "trainer",
                "epoch",
                teacher=teacher if distill else None,
            )

            def before_first(m):
                record_dense(m)
                trainer.snapshot_teacher(m)

            trainer.add_callback(
                RecipeCallback(
                    manager,
                    grad_dataset=p.train,
                    collator=collator,
                    grad_batch_size=job.batch_size,
                    before_first_prune=before_first,
                    progress=job.progress,
                    seed=job.seed,
                )
            )
            trainer.train(resume_from_checkpoint=resume_from)
            if resume_from is not None and "dense" in trainer.extra_state:
                metrics["dense"] = trainer.extra_state["dense"]
                units["dense"] = trainer.extra_state.get("dense_units")
                metrics["resumed_from"] = resume_from
            metrics["optimizer"] = type(trainer._inner_optimizer()).__name__
            metrics["steps"] = trainer.state.global_step
            shutil.rmtree(tmp / "trainer", ignore_errors=True)
            shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
            if "dense" not in metrics:  # the recipe never pruned
                metrics["dense"] = None
        manager.masks.apply(model)
        metrics["pruned"] = p.evaluate(model, progress=job.progress, desc="eval pruned")
        units["pruned"] = metrics["pruned"].pop("units", None)
        _add_intervals(metrics, units, tmp)
        if job.dense_baseline:
            metrics["dense_equal_budget"] = _dense_baseline(
                job, recipe, epochs, tmp / "dense-trainer"
            )
        metrics["sparsity"] = manager.sparsity()
        params = dict(model.named_parameters())
        metrics["param_sparsity"] = {
            n: float((params[n] == 0).float().mean()) for n in manager.pruned_param_names
        }
        metrics["pruning_steps"] = [
            {k: v for k, v in h.items() if k != "param_sparsity"} for h in manager.history
        ]
        metrics["epochs"] = epochs
        metrics["seconds"] = time.perf_counter() - start
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from curvature.integrations.compress import save_compressed, write_sparsity_metadata

        protocol = {
            "model": str(job.model), "data": job.data, "task": p.task, "recipe": recipe.source,
            "max_length": job.max_length, "seed": job.seed, "epochs": epochs, **p.info,
        }  # fmt: skip
        write_sparsity_metadata(tmp, metrics, protocol)
        if job.compressed:
            metrics["compressed"] = save_compressed(model, tmp / "compressed")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / "report.md").write_text(render_report(metrics))
        from curvature.cli.report import write_prune_report

        write_prune_report(tmp)
    return metrics


def _add_intervals(metrics: dict, units: dict, folder: Path) -> None:
    """95% bootstrap intervals of every metric (``m_ci_low``/``m_ci_high``) and, with a dense
    evaluation, the paired difference against it (``m_delta`` and its interval); the units go to
    ``predictions/``."""
    from curvature.tasks import stats

    for name, u in units.items():
        if u is not None:
            stats.write_units(folder / "predictions" / f"{name}.csv", u)
    for name in ("dense", "pruned"):
        ev, u = metrics.get(name), units.get(name)
        if not ev or u is None:
            continue
        for m in [
            k for k in list(ev) if k in ("accuracy", "f1", "exact_match", "perplexity", "loss")
        ]:
            if not stats.has_metric(u, m):
                continue
            ev[f"{m}_ci_low"], ev[f"{m}_ci_high"] = stats.interval(u, m)
            if name == "pruned" and units.get("dense") is not None:
                d, lo, hi = stats.paired_interval(u, units["dense"], m)
                ev[f"{m}_delta"], ev[f"{m}_delta_ci_low"], ev[f"{m}_delta_ci_high"] = d, lo, hi
        if "confidence" in u:
            ev["ece"] = stats.ece(u["confidence"], u["correct"])
    if units.get("dense") is not None and units.get("pruned") is not None:
        if "prediction" in units["pruned"]:
            metrics["pies"] = len(stats.pies([units["pruned"]], [units["dense"]]))


def _check_teacher(recipe, distill, teacher, epochs, given) -> None:
    """Refuse a distillation that would silently not happen, and a teacher nothing reads."""
    from curvature.recipes.schema import _Pruning

    if given and not distill:
        raise JobError(
            f"--teacher {given}: the recipe has no !DistillationModifier, so nothing would read "
            "the teacher; drop --teacher or add the modifier"
        )
    if not distill or epochs <= 0:
        return
    where = f"line {distill[0].line}: " if distill[0].line else ""
    if teacher is None:
        raise JobError(
            f"{where}the recipe distils (!DistillationModifier) but names no teacher: pass "
            "--teacher FOLDER (a dense model trained on this task) or --teacher self (the model "
            "right before its first pruning step)"
        )
    if teacher == "self" and not recipe.of(_Pruning):
        raise JobError(
            f"{where}--teacher self is the model right before its first pruning step, and this "
            "recipe never prunes (sparse transfer keeps the zeros it is given): pass --teacher "
            "FOLDER, a dense model trained on this task"
        )


def _grad_batch_size(recipe, default: int) -> int:
    from curvature.recipes.schema import OBSPruningModifier

    for m in recipe.of(OBSPruningModifier):
        if m.grad_sampler_kwargs.get("batch_size"):
            return int(m.grad_sampler_kwargs["batch_size"])
    return default


def metric_columns(metrics: dict) -> list[str]:
    """The metrics a report shows for a run's task, the task's own metric first."""
    first = metrics.get("metric", "accuracy")
    names = {
        "accuracy": ["accuracy", "f1", "loss"],
        "f1": ["f1", "exact_match"],
        "perplexity": ["perplexity", "loss"],
    }[first]
    pruned = metrics.get("pruned") or {}
    return [n for n in names if n in pruned]


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def render_report(metrics: dict) -> str:
    dense = metrics.get("dense")
    pruned = metrics["pruned"]
    cols = metric_columns(metrics)
    task = metrics.get("task", "sequence-classification")
    lines = [
        "# Pruning report",
        "",
        f"- recipe: `{metrics['recipe']}`, model: `{metrics['model']}`, data: `{metrics['data']}`",
        f"- task: {task}",
        f"- sparsity of the pruned parameters: {metrics['sparsity']:.2%}",
        f"- wall time: {metrics['seconds']:.0f} s",
        "",
        "| model | " + " | ".join(f"validation {c.replace('_', ' ')}" for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]

    def row(label, ev):
        def one(c):
            text = _fmt(ev[c])
            if f"{c}_ci_low" in ev:
                text += f" [{_fmt(ev[c + '_ci_low'])}, {_fmt(ev[c + '_ci_high'])}]"
            if f"{c}_delta" in ev:
                text += (
                    f"; vs dense {ev[c + '_delta']:+.4f} [{ev[c + '_delta_ci_low']:+.4f}, "
                    f"{ev[c + '_delta_ci_high']:+.4f}]"
                )
            return text

        return f"| {label} | " + " | ".join(one(c) for c in cols) + " |"

    if dense:
        lines.append(row("dense (before pruning)", dense))
    base = metrics.get("dense_equal_budget")
    if base:
        lines.append(row(f"dense, the same {base['steps']} steps without pruning", base))
    steps = f", {metrics['steps']} steps" if metrics.get("steps") else ""
    lines.append(row(f"pruned{steps}", pruned))
    if any(k.endswith("_ci_low") for k in pruned):
        lines += [
            "",
            "In brackets: 95% bootstrap intervals over the validation examples; `vs dense` is the "
            "paired difference on the same examples (a real change only when its interval "
            "excludes zero).",
        ]
    if "pies" in metrics:
        ece = pruned.get("ece")
        lines.append(
            f"Pruning changed the prediction of {metrics['pies']} validation examples (PIEs; "
            f"`predictions/` holds both models' predictions)"
            + (
                f"; ECE {dense.get('ece', float('nan')):.3f} dense, {ece:.3f} pruned."
                if ece is not None and dense
                else "."
            )
        )
    skipped = sorted({n for s in metrics.get("pruning_steps", []) for n in s.get("skipped", {})})
    if skipped:
        lines += ["", f"Matched by a `re:` pattern but left dense (1-D): {', '.join(skipped)}"]
    if metrics.get("pruning_steps"):
        lines += ["", "| epoch | method | target | reached | seconds |", "|---|---|---|---|---|"]
        for s in metrics["pruning_steps"]:
            lines.append(
                f"| {s['epoch']:.2f} | {s['method']} ({s['mask']}) | {s['target_sparsity']:.3f} | "
                f"{s['global_sparsity']:.3f} | {s['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"
