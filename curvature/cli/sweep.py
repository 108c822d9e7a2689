"""Sparsity-accuracy sweeps: every method at every sparsity on the same model, split and seed.

Layout of a sweep folder::

    DIR/dense/                 the dense reference (fine-tuned here unless --finetune-epochs 0)
    DIR/points.jsonl           one line per finished point (the resume log)
    DIR/predictions/NAME.csv   each evaluation's units (example id, label, prediction,
                               confidence, loss; per document for a decoder), dense.csv included
    DIR/results.csv|json|md    the table with 95% intervals, rewritten after every point
    DIR/pies.csv               the examples whose prediction pruning changed (classification)
    DIR/report.html            the whole report in one self-contained page
    DIR/*.png                  metric against sparsity, size on disk and measured latency

A rerun with the same arguments skips the points already in ``points.jsonl``; an interrupted run
loses at most the point in progress (each line is written only when its point is complete).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from dataclasses import fields as _fields
from pathlib import Path

from curvature.cli.config import DataConfig, at_least, load_for_job, training_args
from curvature.cli.jobs import PruneJob, run_prune
from curvature.cli.outputs import SweepError
from curvature.cli.report import render
from curvature.cli.results import METRICS, load_points, point_key, point_name
from curvature.pruning import METHODS as PRUNING_METHODS
from curvature.pruning.masks import parse_mask

METHODS = PRUNING_METHODS.names()
#: quantizers a sweep can run (``--bits``): each with each bit width is one row, ``gptq-4bit``
QUANTIZERS = ("gptq", "rtn")
STRUCTURED_CHOOSERS = ("obs", "fisher", "taylor", "magnitude", "activation", "fluctuation")
#: ``structured-<chooser>`` methods remove heads and neurons (each ``--sparsities`` value is the
#: fraction of both removed in every block) and resize the matrices
STRUCTURED = "structured-"


def quant_name(method: str, bits: int) -> str:
    return f"{method}-{bits}bit"


def _not_apply(settings: list[str]) -> str:
    """``--a, --b do not apply`` (``does`` for one)."""
    flags = ", ".join("--" + k.replace("_", "-") for k in settings)
    return f"{flags} {'does' if len(settings) == 1 else 'do'} not apply"


@dataclass(kw_only=True)
class SweepConfig(DataConfig):
    output: str
    methods: list[str] = field(default_factory=lambda: ["obs", "magnitude"])
    # None: 0.5, 0.7, 0.8, 0.9 (an N:M mask: its own 1 - N/M)
    sparsities: list[float] | None = None
    mask: str = "unstructured"
    recipe: str | None = None  # gradual pruning recipe; None means one-shot
    # The pruning settings below: None means the built-in default (one-shot) or the recipe's own
    # value (gradual); a value given applies in both modes.
    params: list[str] | None = None
    finetune_epochs: float = 1.0
    lr: float = 1e-4
    #: the parts' settings (:mod:`curvature.pruning.parts`); each applies to the methods whose
    #: parts have it (one line says which methods it does not apply to)
    gradients: int | None = None  # OBS: per-example gradients in the Fisher
    batches: int | None = None  # calibration batches: layer-wise methods, reconstruct, outlier
    grad_batch_size: int = 8
    block_size: int | None = None  # OBS and magnitude: weights per block
    fisher_damping: float | None = None  # OBS: absolute damping of the Fisher
    rel_damp: float | None = None  # SparseGPT, OBC: damping of H, a fraction of its mean diagonal
    recomputations: int | None = None  # OBS: gradient collections per pruning step
    #: layer-wise methods and GPTQ: the float type of each batch's X^T X and of the solve
    precision: str | None = None
    per_layer: bool = False  # magnitude and Fisher methods per layer (layer-wise ones always are)
    # every point is repeated over this many calibration (one-shot) or fine-tuning (gradual)
    # seeds: seed, seed + 1, ...; the dense model is the same for all
    seeds: int = 1
    speed_reps: int = 5  # timed forwards per format for latency (0: do not measure)
    #: a method every other is compared with at the same mask and target (paired difference and
    #: the share of its damage avoided); not a result key: it only changes the tables
    baseline: str | None = None
    #: the quantizers' bit widths (``--methods gptq,rtn``) and input columns per scale ("none":
    #: one scale per output channel; None: the default, 128)
    bits: list[int] | None = None
    group: str | None = None

    ONESHOT_DEFAULTS = {
        "params": ["__ALL_PRUNABLE__"],
        "gradients": 64,
        "batches": 64,
        "block_size": 32,
        "fisher_damping": 1e-7,
        "rel_damp": 0.01,
        "recomputations": 1,
        "precision": "float64",
    }
    #: the sweep's setting -> the parts' setting of the same name
    PART_SETTINGS = (
        "gradients", "batches", "block_size", "fisher_damping", "rel_damp", "recomputations",
        "precision",
    )  # fmt: skip
    # settings that change a point's result: a rerun into the same folder must match them
    RESULT_KEYS = (
        "model", "data", "seed", "max_train", "max_eval", "max_length", "finetune_epochs",
        "batch_size", "lr", "params", "gradients", "batches", "grad_batch_size", "block_size",
        "fisher_damping", "rel_damp", "recomputations", "recipe", "recipe_sha256", "task",
        "per_layer", "eval_data", "eval_split", "doc_stride", "eval_stride", "bits", "group",
        "precision",
    )  # fmt: skip

    def setting(self, name: str):
        """A pruning setting as it applies: the value given, else the one-shot default."""
        value = getattr(self, name)
        return self.ONESHOT_DEFAULTS[name] if value is None else value

    def method_pipelines(self, say: bool = False) -> dict:
        """``{method: pipeline}`` for one-shot points: each method's parts with the sweep's
        settings that they have. A setting given that no method has is refused; one that some
        methods lack is said (``say``) once per method (it does not apply to them)."""
        from curvature.pruning.registry import pipeline
        from curvature.recipes.schema import modifier_kind

        out, used = {}, set()
        for m in self.pruning_methods():
            pipe = pipeline(m)
            have = set(pipe.settings())
            if self.recipe is not None:  # what the recipe's modifier for this method carries
                have &= set(modifier_kind(pipe).PART_FIELDS)
            values = {k: self.setting(k) for k in self.PART_SETTINGS if k in have}
            if self.batches is None and not pipe.layerwise:
                values.pop("batches", None)  # an added part's own pass: the chooser's count
            used |= {k for k in values if getattr(self, k) is not None}
            skipped = [
                k for k in self.PART_SETTINGS if k not in have and getattr(self, k) is not None
            ]
            if say and skipped:
                why = (
                    "its parts have no such setting"
                    if self.recipe is None
                    else "the recipe's modifier for it has no such field"
                )
                print(f"sweep: {_not_apply(skipped)} to {m} ({why})")
            out[m] = pipe.with_settings(**values)
        for m in self.structured_methods():
            used |= {f.name for f in _fields(self.structured_chooser(m, say=say))}
        if "gptq" in self.quantizers():  # GPTQ reads the layer-wise settings too
            used |= {
                k for k in ("batches", "rel_damp", "precision") if getattr(self, k) is not None
            }
        unused = [k for k in self.PART_SETTINGS if getattr(self, k) is not None and k not in used]
        if unused:
            flag = "--" + unused[0].replace("_", "-")
            raise SweepError(
                f"{flag}: none of --methods ({', '.join(self.methods)}) has this setting"
            )
        return out

    def pruning_methods(self) -> list[str]:
        return [m for m in self.methods if m not in QUANTIZERS and not m.startswith(STRUCTURED)]

    def structured_methods(self) -> list[str]:
        return [m for m in self.methods if m.startswith(STRUCTURED)]

    def structured_chooser(self, method: str, say: bool = False):
        """The structured chooser part of ``structured-<name>`` with the sweep's settings that
        it has (``--batches``; ``--rel-damp`` for obs and fisher; ``--gradients`` for fisher);
        the others are said once (``say``)."""
        from dataclasses import fields

        from curvature.pruning import structured

        cls = structured.CHOOSERS[method[len(STRUCTURED) :]]
        have = {f.name for f in fields(cls)}
        values = {k: getattr(self, k) for k in ("batches", "rel_damp", "gradients") if k in have}
        values = {k: v for k, v in values.items() if v is not None}
        skipped = [
            k for k in self.PART_SETTINGS if getattr(self, k) is not None and k not in values
        ]
        if say and skipped:
            print(f"sweep: {_not_apply(skipped)} to {method} (its part has no such setting)")
        return cls(**values)

    def quantizers(self) -> list[str]:
        return [m for m in self.methods if m in QUANTIZERS]

    def quant_group(self) -> int | None:
        if self.group is None:
            return 128
        return None if self.group == "none" else int(self.group)

    def rows(self) -> list[tuple[str, int | None]]:
        """``[(row name, bits)]``: every pruning method, and every quantizer at every bit width."""
        out = []
        for m in self.methods:
            if m in QUANTIZERS:
                out += [(quant_name(m, b), b) for b in self.bits or []]
            else:
                out.append((m, None))
        return out

    def _validate_quantizers(self) -> None:
        from curvature.pruning.quantize import BITS

        q = self.quantizers()
        if not q:
            for flag, value in (("--bits", self.bits), ("--group", self.group)):
                if value is not None:
                    raise SweepError(
                        f"{flag}: none of --methods ({', '.join(self.methods)}) quantizes; add "
                        "gptq or rtn"
                    )
            return
        if not self.bits:
            raise SweepError(f"--bits: give the bit widths for {', '.join(q)}, e.g. --bits 4,3")
        bad = [b for b in self.bits if b not in BITS]
        if bad:
            raise SweepError(f"--bits: {bad[0]} is not one of {', '.join(map(str, BITS))}")
        if self.group is not None and self.group != "none":
            if not self.group.isdigit() or int(self.group) < 1:
                raise SweepError(f"--group must be a positive integer or none, got {self.group!r}")
        if self.recipe is not None:
            raise SweepError("--recipe: quantizers run one-shot; drop --recipe or gptq/rtn")
        structure = parse_mask(self.mask)
        if structure.name == "block4":
            raise SweepError("--mask block4 cannot be chosen in the quantization sweep; use N:M")
        if "rtn" in q and (structure.nm or any(s > 0 for s in self.sparsities or [])):
            raise SweepError(
                "rtn reads no data and quantizes the dense model: its points need --sparsities 0 "
                "and an unstructured mask (gptq prunes and quantizes in one sweep)"
            )

    def _validate_structured(self) -> None:
        from curvature.core import checks

        found = self.structured_methods()
        for m in found:
            try:
                checks.one_of("--methods", m, [STRUCTURED + c for c in STRUCTURED_CHOOSERS])
            except ValueError as e:
                raise SweepError(str(e)) from None
        if not found:
            return
        if self.recipe is not None:
            raise SweepError(f"--recipe: {found[0]} runs one-shot; drop --recipe or {found[0]}")
        if parse_mask(self.mask).name != "unstructured":
            raise SweepError(
                f"--mask {self.mask}: {found[0]} removes whole heads and neurons (no mask); "
                "sweep masks and structures separately"
            )
        for v in self.sparsities or []:
            if v <= 0:
                raise SweepError(
                    f"--sparsities: {found[0]} removes a fraction > 0 of the heads and neurons of "
                    f"each block, got {v}"
                )

    def validate(self) -> None:
        from curvature.tasks.kinds import check_task

        check_task(self.task)
        self.check()
        at_least("finetune_epochs", self.finetune_epochs, 0, error=SweepError)
        at_least("lr", self.lr, 0, error=SweepError, what="learning rate")
        from curvature.pruning.registry import PARTS, split_spec

        if (
            self.sparsities is None
            and self.methods
            and not self.pruning_methods()
            and not self.structured_methods()
        ):
            if parse_mask(self.mask).fixed_sparsity is None:
                self.sparsities = [0.0]  # quantizers alone: the dense model, quantized
        for m in self.pruning_methods():
            try:
                split_spec(m)  # names an unknown part and the nearest valid one
            except ValueError as e:
                raise SweepError(f"--methods: {e}") from None
        bad = [m for m in self.pruning_methods() if m not in PRUNING_METHODS]
        if bad or not self.methods:
            raise SweepError(
                f"--methods: unknown {bad}; choose from {', '.join(METHODS)}, each with optional "
                f"parts added by + ({', '.join(PARTS)}), e.g. sparsegpt+reconstruct; the "
                f"quantizers {', '.join(QUANTIZERS)} with --bits; or structured-<"
                f"{'|'.join(STRUCTURED_CHOOSERS)}>"
            )
        self._validate_structured()
        structure = parse_mask(self.mask)
        if structure.fixed_sparsity is not None:
            given = self.sparsities
            if given is not None and [round(s, 6) for s in given] != [
                round(structure.fixed_sparsity, 6)
            ]:
                raise SweepError(
                    f"--sparsities: a {structure.name} mask prunes exactly "
                    f"{structure.fixed_sparsity:g}; drop --sparsities or pass {structure.fixed_sparsity:g}"
                )
            self.sparsities = [structure.fixed_sparsity]
        elif self.sparsities is None:
            self.sparsities = [0.5, 0.7, 0.8, 0.9]
        for s in self.sparsities:
            if not 0.0 <= s < 1.0:
                raise SweepError(f"--sparsities: {s} is outside [0, 1)")
        self._validate_quantizers()  # after the default sparsities are known
        block = self.setting("block_size")
        if block % structure.run:
            raise SweepError(
                f"--block-size {block} is not a multiple of the {structure.name} group of {structure.run}"
            )
        if self.seeds < 1:
            raise SweepError(f"--seeds must be >= 1, got {self.seeds}")
        rows = [name for name, _ in self.rows()]
        if self.baseline is not None and self.baseline not in rows:
            raise SweepError(
                f"--baseline {self.baseline!r} is not one of the rows ({', '.join(rows)})"
            )
        if self.speed_reps < 0:
            raise SweepError(f"--speed-reps must be >= 0, got {self.speed_reps}")
        for name in ("gradients", "batches", "block_size", "recomputations"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SweepError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("fisher_damping", "rel_damp"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise SweepError(
                    f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}"
                )
        if self.precision is not None and self.precision not in ("float64", "float32"):
            raise SweepError(f"--precision must be float64 or float32, got {self.precision!r}")
        self.method_pipelines(say=True)  # every given setting applies to a method, or is refused
        if self.recipe is not None:
            from curvature.recipes import load_recipe

            load_recipe(self.recipe)

    #: under torch.distributed, on ranks other than 0: rank 0's folder, where the models this
    #: rank reads back are (Hugging Face saves models on rank 0 only); not a setting
    shared_output: str | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict:
        """The settings as stored in ``sweep.json`` (with the recipe file's content hash)."""
        import hashlib

        out = asdict(self)
        out.pop("shared_output", None)
        out.pop("private_outputs", None)
        out.pop("threads", None)
        if self.recipe is not None:
            out["recipe_sha256"] = hashlib.sha256(Path(self.recipe).read_bytes()).hexdigest()
        return out


def run_sweep(cfg: SweepConfig) -> list[dict]:
    from curvature.integrations.hf import model_loss
    from curvature.tasks.kinds import load_model

    cfg.validate()
    if cfg.task is None:  # the resolved task is recorded, so a rerun that names it matches
        from curvature.tasks.kinds import infer_task

        cfg.task = infer_task(cfg.model, cfg.data)
    out = Path(cfg.output)
    cfg_path = out / "sweep.json"
    record = cfg.record()
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        old.setdefault("per_layer", False)  # folders written before the setting existed
        changed = [
            f"{k} ({old.get(k)!r} there, {record.get(k)!r} now)"
            for k in cfg.RESULT_KEYS
            if old.get(k) != record.get(k)
        ]
        if changed:
            raise SweepError(
                f"{out} holds a sweep with different {'; '.join(changed)}: "
                "use another --output, or the same settings to resume it"
            )
    # load everything that can fail on the user's input before writing anything (seeded)
    task = load_for_job(cfg)
    model, tok = task.model, task.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(record, indent=2))
    dense_dir = out / "dense"
    points = load_points(out)
    # drop a line cut by an interruption so that new points append cleanly
    (out / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    done = {point_key(p) for p in points}

    if not (_read_dir(cfg, "dense", sync=False) / "config.json").is_file():
        if cfg.finetune_epochs > 0:
            _finetune(model, task.train, task.collator, cfg)
        tmp = out / ".dense.partial"
        model.save_pretrained(tmp)  # on rank 0 only under torch.distributed
        tok.save_pretrained(tmp)
        if tmp.exists():
            tmp.rename(dense_dir)
    dense_dir = _read_dir(cfg, "dense")
    dense_model = load_model(task.task, str(dense_dir))
    if ("dense", "-", "-", 0.0, 0) not in done:
        ev = task.evaluate(dense_model, progress=cfg.progress, desc="eval dense")
        point = {"method": "dense", "mask": "-", "mode": "-", "target_sparsity": 0.0}
        _append(
            out,
            {
                **point,
                "sparsity": 0.0,
                **_ev(ev, task, out, point),
                **_sizes(dense_model, out),
                **_speed(dense_model, task, cfg),
                "prune_seconds": 0.0,
                "peak_memory_mb": None,
            },
            points,
        )
    _save_texts(out, task)

    mode = "gradual" if cfg.recipe else "oneshot"
    for method, bits in cfg.rows():
        # one-shot pruning that reads no data (magnitude) gives the same model for every seed
        if bits:
            data = method.startswith("gptq-")
        elif method.startswith(STRUCTURED):
            data = bool(cfg.structured_chooser(method).statistics)
        else:
            data = PRUNING_METHODS[method].needs_data
        repeats = cfg.seeds if mode == "gradual" or data else 1
        for s in cfg.sparsities:
            for k in range(repeats):
                key = (method, parse_mask(cfg.mask).name, mode, round(s, 6), k)
                if key in done:
                    continue
                if bits:
                    point = _quant_point(cfg, method, bits, s, task, dense_dir, model_loss, k)
                elif method.startswith(STRUCTURED):
                    point = _structured_point(cfg, method, s, task, dense_dir, model_loss, k)
                else:
                    point = _run_point(cfg, method, s, mode, task, dense_dir, model_loss, k)
                _append(out, point, points)
    render(out, points)
    return points


def _ev(ev: dict, task, out: Path, point: dict) -> dict:
    """A point's metrics: the task's (see :data:`METRICS`), and which one it is judged by. Its
    units go to ``predictions/NAME.csv`` (on rank 0), where the report's intervals come from."""
    from curvature.core.parallel import world
    from curvature.tasks.stats import write_units

    if "units" in ev and world()[0] == 0:
        write_units(out / "predictions" / f"{point_name(point)}.csv", ev["units"])
    return {"metric": task.metric, **{k: ev[k] for k in METRICS if k in ev}}


def _save_texts(out: Path, task) -> None:
    """The evaluation units' texts (by id), once, for the report's examples."""
    path = out / "predictions" / "texts.json"
    if task.texts is not None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([t[:2000] for t in task.texts]))
    if task.label_names and not (out / "predictions" / "labels.json").exists():
        (out / "predictions" / "labels.json").write_text(json.dumps(list(task.label_names)))


def _speed(model, task, cfg: SweepConfig) -> dict:
    """Measured latency and throughput of each format that exists here (see
    :mod:`curvature.integrations.speed`), on a fixed batch of training inputs."""
    if cfg.speed_reps == 0:
        return {}
    from curvature.integrations.speed import measure

    n = min(cfg.batch_size, len(task.train))
    keep = ("input_ids", "attention_mask", "token_type_ids")
    rows = [{k: v for k, v in task.train[i].items() if k in keep} for i in range(n)]
    batch = task.collator(rows)
    res = measure(model, {k: v for k, v in batch.items() if k in keep}, reps=cfg.speed_reps)
    out = {
        "params_kept": int(sum(int((p != 0).sum()) for p in model.parameters())),
        "speed_batch": res["batch_size"],
        "speed_seq_len": res["sequence_length"],
        "speed_device": res["device"],
    }
    for fmt, r in res["formats"].items():
        out[f"latency_ms_{fmt}"] = r["latency_ms"]
        out[f"throughput_{fmt}"] = r["throughput"]
    return out


def _barrier() -> None:
    import torch.distributed as dist

    from curvature.core.parallel import world

    if world()[1] > 1:
        dist.barrier()


def _read_dir(cfg: SweepConfig, name: str, sync: bool = True) -> Path:
    """Where this rank reads the saved model ``name`` of the sweep folder: its own folder, or on
    ranks other than 0 rank 0's (after a barrier, so that rank 0 has written it)."""
    if sync:  # on every rank (a no-op without a process group)
        _barrier()
    return Path(cfg.shared_output or cfg.output) / name


def _sizes(model, out: Path) -> dict:
    import shutil

    from curvature.integrations.compress import save_compressed

    tmp = out / ".size.tmp"
    sizes = save_compressed(model, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    return sizes


def _append(out: Path, point: dict, points: list) -> None:
    with open(out / "points.jsonl", "a") as fh:
        fh.write(json.dumps(point) + "\n")
        fh.flush()
    points.append(point)
    render(out, points)


def _finetune(model, train, collator, cfg: SweepConfig) -> None:
    from transformers import Trainer

    args = training_args(
        cfg,
        Path(cfg.output) / ".trainer",
        num_train_epochs=cfg.finetune_epochs,
        learning_rate=cfg.lr,
        logging_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()


def _run_point(cfg, method, s, mode, task, dense_dir, model_loss, k: int = 0) -> dict:
    from curvature.cli.utils import peak_memory_bytes, reset_peak_memory
    from curvature.pruning import prune
    from curvature.tasks.kinds import load_model

    reset_peak_memory()
    start = time.perf_counter()
    extra: dict = {}
    if mode == "oneshot":
        model = load_model(task.task, str(dense_dir))
        from curvature.integrations.hf import grad_loader

        # under torch.distributed each rank's shard of the batches (a DistributedSampler)
        grads = grad_loader(task.train, cfg.grad_batch_size, task.collator, cfg.seed + k)
        pipe = cfg.method_pipelines()[method]
        report = prune(
            model,
            grads,
            loss_fn=model_loss,
            sparsity=s,
            method=pipe,
            mask=cfg.mask,
            params=cfg.setting("params"),
            global_sparsity=False if cfg.per_layer or pipe.layerwise else None,
            progress=cfg.progress,
        )
        reached = report.global_sparsity
        if report.allocation:  # the outlier part's targets: their spread across layers
            extra["allocation_min"] = min(report.allocation.values())
            extra["allocation_max"] = max(report.allocation.values())
        if report.reconstruction:
            extra["reconstruct_max_iterations"] = report.reconstruction["max_iterations"]
            before, after = (report.reconstruction[k] for k in ("error_before", "error_after"))
            extra["reconstruct_error_ratio"] = after / before if before else None
    else:
        from curvature.recipes import load_recipe

        recipe = _recipe_for(load_recipe(cfg.recipe), method, s, cfg)
        tmp = Path(cfg.output) / f".point-{method}-{s}-{k}"
        job = PruneJob(
            recipe=recipe,
            model=str(dense_dir),
            data=cfg.data,
            output=str(tmp),
            max_train=cfg.max_train,
            max_eval=cfg.max_eval,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed + k,
            overwrite=True,
            progress=cfg.progress,
            task=task.task,
            doc_stride=cfg.doc_stride,
            eval_split=cfg.eval_split,
            eval_data=cfg.eval_data,
            eval_stride=cfg.eval_stride,
            private_outputs=cfg.private_outputs,
        )
        metrics = run_prune(job)
        model = load_model(task.task, str(_read_dir(cfg, tmp.name)))
        reached = metrics["sparsity"]
        import shutil

        _barrier()  # every rank has read the point's model before rank 0 removes it
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    peak = peak_memory_bytes()
    ev = task.evaluate(model, progress=cfg.progress, desc=f"eval {method} {s}")
    point = {
        "method": method,
        "mask": parse_mask(cfg.mask).name,
        "mode": mode,
        "target_sparsity": s,
        "seed_index": k,
        "seed": cfg.seed + k,
    }
    return {
        **point,
        "sparsity": reached,
        **_ev(ev, task, Path(cfg.output), point),
        **_sizes(model, Path(cfg.output)),
        **_speed(model, task, cfg),
        "prune_seconds": seconds,
        "peak_memory_mb": peak / 2**20 if peak else None,
        **extra,
    }


def _block_linear_weights(model) -> int:
    """Weights of the linear layers inside the model's repeated blocks (what structures remove)."""
    import torch

    from curvature.pruning.structures import _repeated_blocks

    blocks, _ = _repeated_blocks(model)
    return sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))


def _structured_point(cfg, method, s, task, dense_dir, model_loss, k: int = 0) -> dict:
    """The dense model with the fraction ``s`` of the heads and of the neurons of every block
    removed by a structured chooser, the matrices resized: its evaluation, the size of its file
    and its measured latency (smaller matrices, the format every runtime runs). ``sparsity`` is
    the share of the blocks' linear weights removed."""
    from curvature.cli.utils import peak_memory_bytes, reset_peak_memory
    from curvature.integrations.hf import grad_loader
    from curvature.pruning import structured
    from curvature.tasks.kinds import load_model

    reset_peak_memory()
    start = time.perf_counter()
    model = load_model(task.task, str(dense_dir))
    before = _block_linear_weights(model)
    data = grad_loader(task.train, cfg.grad_batch_size, task.collator, cfg.seed + k)
    try:
        report = structured.run(
            model, data, model_loss, {"heads": s, "neurons": s}, cfg.structured_chooser(method),
            progress=cfg.progress,
        )  # fmt: skip
    except ValueError as exc:
        raise SweepError(f"{method} at {s:g}: {exc}") from None
    seconds = time.perf_counter() - start
    peak = peak_memory_bytes()
    ev = task.evaluate(model, progress=cfg.progress, desc=f"eval {method} {s}")
    point = {"method": method, "mask": "structured", "mode": "oneshot", "target_sparsity": s,
             "seed_index": k, "seed": cfg.seed + k}  # fmt: skip
    return {
        **point,
        "sparsity": 1.0 - _block_linear_weights(model) / before,
        "structure_sizes": report.sizes,
        **_ev(ev, task, Path(cfg.output), point),
        **_sizes(model, Path(cfg.output)),
        **_speed(model, task, cfg),
        "prune_seconds": seconds,
        "peak_memory_mb": peak / 2**20 if peak else None,
    }


def _quant_point(cfg, name, bits, s, task, dense_dir, model_loss, k: int = 0) -> dict:
    """The dense model quantized by one quantizer at ``bits`` (GPTQ pruning ``s`` or the mask's
    N:M in the same sweep): its evaluation, its packed file's size and bits per parameter."""
    import shutil

    from curvature.cli.utils import peak_memory_bytes, reset_peak_memory
    from curvature.integrations.hf import grad_loader
    from curvature.pruning.quantization import Quantize, bits_per_parameter, quantize_model
    from curvature.tasks.kinds import load_model

    reset_peak_memory()
    start = time.perf_counter()
    model = load_model(task.task, str(dense_dir))
    method = name.split("-")[0]
    settings = {}
    if method == "gptq":
        settings = {k: cfg.setting(k) for k in ("batches", "rel_damp", "precision")}
    part = Quantize(bits=bits, group=cfg.quant_group(), method=method, **settings)
    data = grad_loader(task.train, cfg.grad_batch_size, task.collator, cfg.seed + k)
    params = cfg.params if cfg.params and cfg.params != ["__ALL_PRUNABLE__"] else None
    if params is not None:
        from curvature.pruning import select_params

        params = [n for n, _ in select_params(model, params)]
    try:
        rep = quantize_model(
            model, data, model_loss, part, params=params, sparsity=s, mask=cfg.mask,
            progress=cfg.progress,
        )  # fmt: skip
    except ValueError as exc:
        raise SweepError(f"{name}: {exc}") from None
    seconds = time.perf_counter() - start
    peak = peak_memory_bytes()
    ev = task.evaluate(model, progress=cfg.progress, desc=f"eval {name} {s}")
    point = {"method": name, "mask": parse_mask(cfg.mask).name, "mode": "oneshot",
             "target_sparsity": s, "seed_index": k, "seed": cfg.seed + k}  # fmt: skip
    sizes = _sizes(model, Path(cfg.output))  # the float file, and its bitmask form
    tmp = Path(cfg.output) / ".packed.tmp"
    try:
        from curvature.integrations.packed import save_packed

        saved = save_packed(model, rep, tmp)
        sizes["compressed_bytes"], sizes["compressed_format"] = saved["bytes"], saved["format"]
    except ValueError as exc:  # a grid the packed format cannot store: the bits counted instead
        bpp = bits_per_parameter(rep)
        per = next(model.parameters()).element_size()
        sizes["compressed_bytes"] = round(
            sizes["dense_bytes"] - per * bpp["weights"]
            + bpp["bits_per_weight"] * bpp["weights"] / 8
        )  # fmt: skip
        sizes["compressed_format"] = f"counted, not written ({str(exc).split(';')[0]})"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    masks = [q.mask for q in rep.layers.values() if q.mask is not None]
    pruned = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks) if masks else 0.0
    return {
        **point,
        "sparsity": pruned,  # what the sweep pruned (weights rounded to zero are not counted)
        "bits": bits,
        "group": cfg.quant_group(),
        **bits_per_parameter(rep),
        **_ev(ev, task, Path(cfg.output), point),
        **sizes,
        "prune_seconds": seconds,
        "peak_memory_mb": peak / 2**20 if peak else None,
    }


def _recipe_for(recipe, method, sparsity, cfg: SweepConfig):
    """The recipe with its pruning modifiers switched to ``method`` at ``sparsity``, with every
    pruning setting the sweep was given (the recipe layer writes them as published fields)."""
    from curvature.recipes.schema import _Pruning

    recipe = copy.deepcopy(recipe)
    settings = {k: getattr(cfg, k) for k in cfg.PART_SETTINGS}
    recipe.modifiers = [
        m.retarget(
            method=method,
            sparsity=sparsity,
            mask=cfg.mask,
            settings=settings,
            params=cfg.params,
            per_layer=cfg.per_layer,
        )
        if isinstance(m, _Pruning)
        else m
        for m in recipe.modifiers
    ]
    return recipe


__all__ = ["SweepConfig", "run_sweep"]
