"""The ``curvature prune`` job: fine-tune and prune a Hugging Face model per a recipe, on any task
of :mod:`curvature.tasks.kinds` (classification, question answering, masked or causal LM).

Everything that can be checked is checked before work starts (recipe, data, model, parameter
names, output folder). Output is written to a temporary folder beside the target and renamed into
place only when the job succeeds, so a failed run never leaves a half-written output.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from curvature.cli.config import DataConfig, at_least, load_for_job, training_args
from curvature.cli.outputs import (
    JobError,
    atomic_output,
    check_output,
    checkpoint_dir,
    latest_checkpoint,
)
from curvature.cli.report import write_prune_report
from curvature.cli.results import render_report
from curvature.recipes import Recipe
from curvature.recipes.schema import GPTQModifier, StructureModifier


@dataclass(kw_only=True)
class PruneJob(DataConfig):
    recipe: str | Recipe  # a recipe file, or an already validated Recipe
    output: str = "runs/pruned"
    oneshot: bool = False
    lr: float = 5e-5
    teacher: str | None = None
    overrides: dict = field(default_factory=dict)
    overwrite: bool = False
    optimizer: str | None = None  # overrides the recipe's !OptimizerModifier
    optimizer_kwargs: dict | None = None
    checkpoint_every: int | None = None  # save a resumable checkpoint every N training steps
    resume: bool = False  # continue from the latest checkpoint of an interrupted run
    dense_baseline: bool = False  # also train the dense model for the same steps (no pruning)
    compressed: bool = False  # also write the bitmask checkpoint to OUTPUT/compressed
    float_weights: bool = False  # a quantized model saved dequantized in float, not packed

    def check(self) -> None:
        super().check()
        at_least("lr", self.lr, 0, what="learning rate")

    def checkpointing(self) -> int | None:
        """``checkpoint_every`` for :func:`training_args`: None when the run keeps no
        checkpoints, 0 when it only resumes."""
        if self.checkpoint_every is None and not self.resume:
            return None
        return self.checkpoint_every or 0


def _recipe_trainer(job, manager, p, epochs, output_dir, *, logging, saving=None, teacher=None):
    """The Trainer of a prune job (and of its dense baseline): the recipe's rate when it sets
    one (a constant scheduler the recipe overrides), else a linear decay from ``job.lr``;
    ``saving``: :meth:`PruneJob.checkpointing` for the run, None for the baseline."""
    from curvature.integrations.hf import RecipeTrainer

    args = training_args(
        job,
        output_dir,
        checkpoint_every=saving,
        num_train_epochs=epochs,
        learning_rate=job.lr,
        lr_scheduler_type="constant" if manager.lr_at(0.0) is not None else "linear",
        logging_strategy=logging,
    )
    return RecipeTrainer(
        model=manager.model,
        args=args,
        train_dataset=p.train,
        data_collator=p.collator,
        manager=manager,
        teacher=teacher,
        optimizer_name=job.optimizer,
        optimizer_kwargs=job.optimizer_kwargs,
    )


def _dense_baseline(job, recipe: Recipe, epochs: float, work: Path) -> tuple[dict, dict]:
    """The dense model trained for the same steps as the pruned run: the same recipe without its
    pruning and distillation modifiers (learning-rate and epoch modifiers kept), the same seed,
    data order, batch size and optimizer; its validation metrics with the steps, and its units.
    ``work`` (inside the job's partial output, so removed with it) holds the Trainer's files."""
    from curvature.integrations.hf import RecipeCallback
    from curvature.recipes import RecipeManager
    from curvature.recipes.schema import DistillationModifier, StructureModifier, _Pruning

    removed = (_Pruning, DistillationModifier, StructureModifier)
    dense_recipe = Recipe(
        modifiers=[m for m in recipe.modifiers if not isinstance(m, removed)],
        variables=recipe.variables,
        source=recipe.source,
    )
    p = load_for_job(job)
    model = p.model
    manager = RecipeManager(dense_recipe, model)
    trainer = _recipe_trainer(job, manager, p, epochs, work, logging="no")
    trainer.add_callback(RecipeCallback(manager, progress=job.progress, seed=job.seed))
    result = trainer.train()
    shutil.rmtree(work, ignore_errors=True)
    ev = p.evaluate(model, progress=job.progress, desc="eval dense baseline")
    units = ev.pop("units", None)
    return {**ev, "steps": result.global_step, "epochs": epochs}, units


@torch.no_grad()
def _output_keys(model, batch) -> list[str]:
    """Names of the outputs ``model`` returns on ``batch`` (what distillation can read)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    model.train(was)
    return [k for k in out.keys() if k != "loss"]


@dataclass
class _Run:
    """A prune job once everything that can fail on the user's input has been checked."""

    job: PruneJob
    recipe: Recipe
    out: Path
    epochs: float
    teacher: object  # None, "self" or a model folder
    distill: list
    resume_from: str | None
    p: object  # the loaded task (curvature.tasks.kinds.Prepared)
    manager: object  # curvature.recipes.RecipeManager
    metrics: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)  # evaluations' units (predictions/*.csv)
    trainer: object = None
    groups: list | None = None  # the structures of a model whose heads or neurons were removed
    dense_latency: dict = field(default_factory=dict)  # {batch size: ms} before they were
    quantized: object = None  # the quantization report: the model is saved packed

    def record_dense(self, model) -> None:
        if self.metrics.get("dense") is not None:  # evaluated before the structures went
            return
        self.metrics["dense"] = self.p.evaluate(
            model, progress=self.job.progress, desc="eval dense"
        )
        self.units["dense"] = self.metrics["dense"].pop("units", None)
        if self.trainer is not None:  # saved with checkpoints: a resumed run reports the same
            self.trainer.extra_state["dense"] = self.metrics["dense"]
            self.trainer.extra_state["dense_units"] = self.units["dense"]


def _checked(job: PruneJob) -> _Run:
    """Check the recipe, the task, the output folder, the options and the teacher, then load
    the task and the recipe's manager (which checks every params entry against the model)."""
    from curvature.recipes import RecipeManager, load_recipe
    from curvature.recipes.schema import DistillationModifier
    from curvature.tasks.kinds import check_task

    check_task(job.task)
    job.check()
    recipe = (
        job.recipe if isinstance(job.recipe, Recipe) else load_recipe(job.recipe, job.overrides)
    )
    out = Path(job.output)
    check_output(out, job.overwrite)
    epochs = 0.0 if job.oneshot else recipe.num_epochs
    gradual = epochs > 0 and any(m.gradual for m in recipe.of(StructureModifier))
    if gradual and (job.resume or job.checkpoint_every is not None):
        raise JobError(
            f"{'--resume' if job.resume else '--checkpoint-every'}: a run that removes "
            "structures gradually cannot be resumed (a checkpoint's matrices are smaller than "
            "the model its configuration builds); run it without checkpoints"
        )
    resume_from = str(latest_checkpoint(out)) if job.resume else None
    if job.checkpoint_every is not None and job.checkpoint_every < 1:
        raise JobError(f"--checkpoint-every must be >= 1, got {job.checkpoint_every}")
    if job.dense_baseline and epochs <= 0:
        raise JobError(
            "--dense-baseline trains the dense model for the run's steps, and this run has none "
            "(--oneshot, or a recipe without epochs): drop --dense-baseline"
        )
    if job.compressed and recipe.of(StructureModifier):
        raise JobError(
            "--compressed writes the bitmask checkpoint with the model's original configuration; "
            "a model whose heads or neurons were removed is saved (smaller) without it: drop "
            "--compressed"
        )
    distill = recipe.of(DistillationModifier)
    teacher = job.teacher or (distill[0].teacher if distill else None)
    _check_teacher(recipe, distill, teacher, epochs, job.teacher)
    p = load_for_job(job)
    manager = RecipeManager(recipe, p.model)
    if gradual:
        _check_gradual_optimizer(job, manager)
    _check_quantizer(recipe, p.model, packed=not job.float_weights)
    if job.float_weights and not recipe.of(GPTQModifier):
        raise JobError("--float-weights: the recipe quantizes nothing (no GPTQModifier); drop it")
    if distill and epochs > 0:
        manager.check_outputs(_output_keys(p.model, p.collator([p.train[0]])))
    return _Run(job, recipe, out, epochs, teacher, distill, resume_from, p, manager)


def _check_gradual_optimizer(job: PruneJob, manager) -> None:
    """Matrices that shrink during training: the optimizer must be able to follow them."""
    from curvature.optim.registry import get as optimizer_row

    spec = manager.optimizer_spec()
    name = job.optimizer or (spec[0] if spec else None)
    if name is not None and not optimizer_row(name).elementwise:
        raise JobError(
            f"optimizer {name} keeps curvature over whole matrices, which cannot follow "
            "structures removed during training: use adamw, sgd, lamb or adahessian, or remove "
            "the structures once (end_epoch -1)"
        )


def _check_quantizer(recipe: Recipe, model, packed: bool) -> None:
    """What a quantizing recipe cannot do is one line before anything runs (and again before
    quantizing, on the sizes structures left): a tied embedding table to round, and, saved packed,
    a grid or a layer the format cannot store."""
    from curvature.pruning.layerwise import layer_targets
    from curvature.pruning.quantization import embedding_weight

    for m in recipe.of(GPTQModifier):
        from curvature.integrations.packed import check_packable

        try:
            if m.embedding_bits is not None:
                embedding_weight(model)  # refuses a table tied to the output head
            if not packed:
                continue
            targets = layer_targets(model, m.weights(model))
            for t in targets:
                if type(t.module) is not torch.nn.Linear:
                    raise ValueError(
                        f"{t.name} is a {type(t.module).__name__}, which the packed format does "
                        "not store; exclude it from params or save with --float-weights"
                    )
            check_packable(m.part(), {t.name: t.cols for t in targets})
        except ValueError as exc:
            raise JobError(f"line {m.line}: GPTQModifier: {exc}") from None


def _oneshot(run: _Run) -> None:
    from curvature.integrations.hf import grad_loader, model_loss

    job, p = run.job, run.p
    run.record_dense(p.model)
    loader = grad_loader(
        p.train, _grad_batch_size(run.recipe, job.batch_size), p.collator, job.seed
    )
    run.manager.step(math.inf, grad_data=loader, loss_fn=model_loss, progress=job.progress)


def _latency_batch(run: _Run, size: int) -> dict:
    # the timed batch: size x --max-length tokens (values do not change the time)
    import warnings

    from curvature.tasks.kinds import fit_length

    with warnings.catch_warnings():  # said once already, when the task was loaded
        warnings.simplefilter("ignore")
        length = fit_length(run.p.model, run.job.max_length)
    gen = torch.Generator().manual_seed(0)
    vocab = run.p.model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (size, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _remove_whole(run: _Run, mod, data, info: dict) -> None:
    """Whole blocks first, then whole attention / feed-forward modules inside the blocks left
    (the heads and neurons of what remains go after)."""
    from curvature.integrations.hf import model_loss
    from curvature.pruning import structured

    model = run.p.model
    try:
        if mod.layers:
            info["layers"] = structured.drop_layers(
                model, data, model_loss, mod.layers, mod.layer_method, mod.num_calibration_batches
            )
        for kind in structured.MODULE_KINDS:
            count = getattr(mod, f"{kind}_modules")
            if count:
                info.setdefault("modules", {})[kind] = structured.drop_modules(
                    model, data, model_loss, kind, count, mod.num_calibration_batches
                )
    except ValueError as exc:
        raise JobError(f"StructureModifier: {exc}") from None


def _structured(run: _Run) -> None:
    """Remove the heads and neurons the recipe's structure modifier asks for (sizes from its
    fractions, or planned from a measured latency table for its speed-up), then rebuild the
    manager on the smaller model for the rest of the recipe."""
    import copy

    from curvature.integrations.hf import grad_loader, model_loss
    from curvature.integrations.latency import measure_model, measure_table
    from curvature.pruning import structured
    from curvature.recipes import RecipeManager

    job, p = run.job, run.p
    (mod,) = run.recipe.of(StructureModifier)
    run.record_dense(p.model)
    if run.teacher == "self" and run.distill:
        run.teacher = copy.deepcopy(p.model).eval()  # the dense model, before the structures go
    data = grad_loader(p.train, job.batch_size, p.collator, job.seed)
    info: dict = {"method": mod.method_name}
    run.dense_latency = {
        size: measure_model(p.model, _latency_batch(run, size))
        for size in (mod.latency_batch_size, 1)
    }
    before = sum(t.numel() for t in p.model.parameters())
    _remove_whole(run, mod, data, info)
    targets = mod.targets()
    if mod.speedup is not None:
        batch = _latency_batch(run, mod.latency_batch_size)
        table = measure_table(p.model, batch)
        fastest = table.dense_ms / table.predict(min(table.heads), min(table.neurons))
        if fastest < mod.speedup:
            raise JobError(
                f"speedup {mod.speedup:g} cannot be met: one head and {min(table.neurons)} "
                f"neurons per block are predicted at {fastest:.2f}x on this machine (batch "
                f"{table.batch_size} x {table.sequence_length}, {table.threads} threads)"
            )
        t0 = time.perf_counter()
        curves = structured.error_curves(
            p.model, data, model_loss, rel_damp=mod.damp, batches=mod.num_calibration_batches,
            progress=job.progress,
        )  # fmt: skip
        if mod.uniform:
            plan = structured.plan_sizes(
                curves,
                {"heads": list(table.heads), "neurons": list(table.neurons)},
                lambda kept: table.predict(kept.get("heads"), kept.get("neurons")),
                table.dense_ms / mod.speedup,
            )
        else:
            latency = {k: v for k, v in (("heads", table.heads), ("neurons", table.neurons)) if v}
            plan = structured.plan_block_sizes(
                curves, latency, table.dense_ms, table.dense_ms / mod.speedup
            )
        targets = plan.targets
        info["planned_sizes"] = plan.kept
        info.update(
            speedup_target=mod.speedup,
            predicted_speedup=table.dense_ms / plan.cost,
            latency_table=table.as_dict(),
            seconds_error_curves=time.perf_counter() - t0,
        )
    run.metrics["structured"] = info
    info["targets"] = targets
    if mod.gradual and run.epochs > 0:  # removed during training, step by step
        run.manager.structure_targets = targets
        info["params_before"] = sum(t.numel() for t in p.model.parameters())
        info["schedule"] = [{"epoch": e, "share": x} for e, x in mod.progress()]
        return
    if not targets:  # whole blocks only
        run.groups = []
        info.update(sizes={}, params_after=sum(t.numel() for t in p.model.parameters()))
        info.update(seconds=0.0, estimated_error=0.0)
    else:
        report = structured.run(p.model, data, model_loss, targets, mod.chooser(), job.progress)
        run.groups = report.groups
        info.update(
            sizes=report.sizes, params_after=report.params_after, seconds=report.seconds,
            estimated_error=report.estimated_error,
        )  # fmt: skip
    info["params_before"] = before
    if run.epochs > 0:  # fine-tuned next: what the removal alone keeps, before any training
        run.metrics["before_training"] = p.evaluate(
            p.model, progress=job.progress, desc="eval before training"
        )
        run.units["before_training"] = run.metrics["before_training"].pop("units", None)
    run.manager = RecipeManager(run.recipe, p.model)  # parameters were replaced by smaller ones
    run.manager.structures_removed()
    # the sizes the structures left, checked against the quantizer before any training
    _check_quantizer(run.recipe, p.model, packed=not job.float_weights)


def _quantize(run: _Run) -> None:
    """Quantize the (pruned, trained) model as the recipe's quantization modifier says; the
    masks are applied first so pruned weights stay zero."""
    from curvature.integrations.hf import grad_loader, model_loss
    from curvature.pruning.quantization import bits_per_parameter, quantize_model

    job, p = run.job, run.p
    (mod,) = run.recipe.of(GPTQModifier)
    run.record_dense(p.model)  # a recipe that only quantizes: the dense model is the reference
    run.manager.masks.apply(p.model)
    _check_quantizer(run.recipe, p.model, packed=not job.float_weights)
    params = [n for n, _ in mod.weights(p.model)]
    data = grad_loader(p.train, job.batch_size, p.collator, job.seed)
    rep = run.quantized = quantize_model(
        p.model, data, model_loss, mod.part(), params=params, progress=job.progress,
        sparsity=mod.sparsity, mask=mod.mask_type,
    )  # fmt: skip
    run.metrics["quantized"] = {
        "method": rep.part.name, "bits": rep.part.bits, "group": rep.part.group,
        "layers": len(rep.layers), "seconds": rep.seconds, "batches": rep.batches,
        "estimated_error": rep.estimate, **bits_per_parameter(rep),
        "sparsity": mod.sparsity, "mask_type": mod.mask_type,
        "zeros": _zeros(p.model, list(rep.layers)),
    }  # fmt: skip
    masks = [q.mask for q in rep.layers.values() if q.mask is not None]
    if masks:  # pruned in the same sweep: the share of the quantized weights it pruned
        run.metrics["quantized"]["pruned"] = sum(int(m.sum()) for m in masks) / sum(
            m.numel() for m in masks
        )


def _zeros(model, names: list[str]) -> float:
    """The fraction of zeros in the named weights."""
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    return sum(int((params[n] == 0).sum()) for n in names) / max(total, 1)


def _latencies(run: _Run, model) -> dict:
    """Dense and pruned forward times (ms, median of 7) at the latency batch and at batch 1."""
    from curvature.integrations.latency import measure_model

    length = _latency_batch(run, 1)["input_ids"].shape[1]
    if next(model.parameters()).device.type != "cpu":  # timed where the dense model was
        import copy

        model = copy.deepcopy(model).to("cpu")
    out = {"threads": torch.get_num_threads(), "sequence_length": length, "device": "cpu"}
    out["batches"] = []
    for size, dense_ms in run.dense_latency.items():
        ms = measure_model(model, _latency_batch(run, size))
        out["batches"].append(
            {"batch_size": size, "dense_ms": dense_ms, "pruned_ms": ms, "speedup": dense_ms / ms}
        )
    return out


def _train(run: _Run, tmp: Path) -> None:
    """Fine-tune with the recipe's pruning (and distillation) through the Trainer."""
    from curvature.integrations.hf import RecipeCallback

    job, p, teacher = run.job, run.p, run.teacher
    if isinstance(teacher, str) and teacher != "self":
        from curvature.tasks.kinds import load_model

        teacher = load_model(p.task, teacher).eval()
    saving = job.checkpointing()
    trainer = run.trainer = _recipe_trainer(
        job,
        run.manager,
        p,
        run.epochs,
        checkpoint_dir(run.out) if saving is not None else tmp / "trainer",
        logging="epoch",
        saving=saving,
        teacher=teacher if run.distill else None,
    )

    def before_first(m):
        run.record_dense(m)
        trainer.snapshot_teacher(m)

    trainer.add_callback(
        RecipeCallback(
            run.manager,
            grad_dataset=p.train,
            collator=p.collator,
            grad_batch_size=job.batch_size,
            before_first_prune=before_first,
            progress=job.progress,
            seed=job.seed,
        )
    )
    trainer.train(resume_from_checkpoint=run.resume_from)
    metrics = run.metrics
    if run.resume_from is not None and "dense" in trainer.extra_state:
        metrics["dense"] = trainer.extra_state["dense"]
        run.units["dense"] = trainer.extra_state.get("dense_units")
        metrics["resumed_from"] = run.resume_from
    metrics["optimizer"] = type(trainer._inner_optimizer()).__name__
    metrics["steps"] = trainer.state.global_step
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    shutil.rmtree(checkpoint_dir(run.out), ignore_errors=True)
    metrics.setdefault("dense", None)  # None: the recipe never pruned
    steps = run.manager.structure_steps
    if steps:  # a gradual structure removal: what it left, step by step
        run.groups = run.manager.structure_groups
        info = metrics["structured"]
        info.update(
            sizes=steps[-1]["sizes"], params_after=steps[-1]["params_after"], steps=steps,
            seconds=sum(h["seconds"] for h in steps),
            estimated_error=sum(h["estimated_error"] for h in steps),
        )  # fmt: skip


def _save(run: _Run, tmp: Path, start: float) -> None:
    """Evaluate the pruned model and write it with its metrics and reports into ``tmp``."""
    from curvature.integrations.compress import save_compressed, write_sparsity_metadata

    job, p, manager, metrics = run.job, run.p, run.manager, run.metrics
    model = p.model
    manager.masks.apply(model)
    metrics["pruned"] = p.evaluate(model, progress=job.progress, desc="eval pruned")
    run.units["pruned"] = metrics["pruned"].pop("units", None)
    if job.dense_baseline:
        metrics["dense_equal_budget"], run.units["dense_equal_budget"] = _dense_baseline(
            job, run.recipe, run.epochs, tmp / "dense-trainer"
        )
    _add_intervals(metrics, run.units, tmp)
    metrics["sparsity"] = manager.sparsity()
    if not manager.pruned_param_names and "pruned" in metrics.get("quantized", {}):
        metrics["sparsity"] = metrics["quantized"]["pruned"]  # GPTQ pruned in its sweep
    params = dict(model.named_parameters())
    metrics["param_sparsity"] = {
        n: float((params[n] == 0).float().mean()) for n in manager.pruned_param_names
    }
    metrics["pruning_steps"] = [
        {k: v for k, v in h.items() if k != "param_sparsity"} for h in manager.history
    ]
    metrics["epochs"] = run.epochs
    metrics["seconds"] = time.perf_counter() - start
    _write_model(run, model, tmp)
    metrics["model_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    protocol = {
        "model": str(job.model), "data": job.data, "task": p.task, "recipe": run.recipe.source,
        "max_length": job.max_length, "seed": job.seed, "epochs": run.epochs, **p.info,
    }  # fmt: skip
    write_sparsity_metadata(tmp, metrics, protocol)
    if job.compressed:
        metrics["compressed"] = save_compressed(model, tmp / "compressed")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / "report.md").write_text(render_report(metrics))
    write_prune_report(tmp)


def run_prune(job: PruneJob) -> dict:
    """Fine-tune and prune as the recipe says (or prune one-shot), evaluate, and write the
    pruned model, ``metrics.json`` and the reports to ``job.output`` atomically."""
    start = time.perf_counter()
    run = _checked(job)  # everything that can fail on the user's input, before any output
    p = run.p
    with atomic_output(run.out, private=job.private_outputs) as tmp:
        run.metrics.update(recipe=run.recipe.source, model=str(job.model), data=job.data)
        run.metrics.update(task=p.task, metric=p.metric, higher_is_better=p.higher_is_better)
        run.metrics.update(p.info)
        if run.recipe.of(StructureModifier):
            _structured(run)
        if run.epochs <= 0:
            _oneshot(run)
        else:
            _train(run, tmp)
        if run.recipe.of(GPTQModifier):
            _quantize(run)
        _save(run, tmp, start)
    return run.metrics


#: what the pruned model is compared with, first choice first: the dense model trained for the
#: same steps without pruning (``--dense-baseline``), else the dense model before pruning
REFERENCES = {
    "dense_equal_budget": "dense, the same steps without pruning",
    "dense": "dense, before pruning",
}


def _write_model(run: _Run, model, tmp: Path) -> None:
    """Save the model: smaller matrices when structures were removed, packed integer weights
    when it was quantized, both when both."""
    tok = run.p.tokenizer
    save = None
    if run.groups is not None:
        from curvature.integrations.structured import save_structured

        removed = run.metrics["structured"].get("modules", {})
        # the attention modules replaced whole, for load_structured to build them again
        silent = {n: spec for r in removed.values() for n, spec in r["modules"].items()}

        def save(state=None):
            extra = {"modules": silent} if silent else None
            info = save_structured(model, run.groups, tmp, tok, extra=extra, state_dict=state)
            run.metrics["structured"]["saved"] = info

        run.metrics["structured"]["latency"] = _latencies(run, model)
    if run.quantized is not None and not run.job.float_weights:
        from curvature.integrations.packed import save_packed

        run.metrics["quantized"]["saved"] = save_packed(model, run.quantized, tmp, tok, save=save)
    elif save is not None:
        save()
    else:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def _add_intervals(metrics: dict, units: dict, folder: Path) -> None:
    """95% bootstrap intervals of every metric (``m_ci_low``/``m_ci_high``) and the pruned
    model's paired difference (``m_delta`` and its interval) against the first dense model of
    :data:`REFERENCES` that was evaluated (``metrics["compared_with"]`` names it); against the
    other one too as ``m_delta_<name>``; the same for the model right after a structure removal
    that training then recovers (``before_training``). The PIEs count against the same reference. The units go
    to ``predictions/``."""
    from curvature.tasks import stats

    for name, u in units.items():
        if u is not None:
            stats.write_units(folder / "predictions" / f"{name}.csv", u)
    refs = [r for r in REFERENCES if metrics.get(r) and units.get(r) is not None]
    for name in ("dense", "dense_equal_budget", "before_training", "pruned"):
        ev, u = metrics.get(name), units.get(name)
        if not ev or u is None:
            continue
        for m in [
            k for k in list(ev) if k in ("accuracy", "f1", "exact_match", "perplexity", "loss")
        ]:
            if not stats.has_metric(u, m):
                continue
            ev[f"{m}_ci_low"], ev[f"{m}_ci_high"] = stats.interval(u, m)
            if name not in ("pruned", "before_training"):
                continue
            for i, ref in enumerate(refs):
                key = f"{m}_delta" if i == 0 else f"{m}_delta_{ref}"
                d, lo, hi = stats.paired_interval(u, units[ref], m)
                ev[key], ev[f"{key}_ci_low"], ev[f"{key}_ci_high"] = d, lo, hi
        if "confidence" in u:
            ev["ece"] = stats.ece(u["confidence"], u["correct"])
    if refs:
        metrics["compared_with"] = refs[0]
        if units.get("pruned") is not None and "prediction" in units["pruned"]:
            metrics["pies"] = len(stats.pies([units["pruned"]], [units[refs[0]]]))


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
    if teacher == "self" and not recipe.of(_Pruning, StructureModifier):
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
