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
import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from curvature.pruning import METHODS as PRUNING_METHODS
from curvature.pruning.masks import parse_mask

METHODS = PRUNING_METHODS.names()


class SweepError(ValueError):
    pass


@dataclass
class SweepConfig:
    output: str
    model: str = "default"
    data: str = "bbc-news"
    methods: list[str] = field(default_factory=lambda: ["obs", "magnitude"])
    # None: 0.5, 0.7, 0.8, 0.9 (an N:M mask: its own 1 - N/M)
    sparsities: list[float] | None = None
    mask: str = "unstructured"
    recipe: str | None = None  # gradual pruning recipe; None means one-shot
    # The pruning settings below: None means the built-in default (one-shot) or the recipe's own
    # value (gradual); a value given applies in both modes.
    params: list[str] | None = None
    finetune_epochs: float = 1.0
    max_train: int | None = None
    max_eval: int | None = None
    max_length: int = 128
    batch_size: int = 16
    lr: float = 1e-4
    #: the parts' settings (:mod:`curvature.pruning.parts`); each applies to the methods whose
    #: parts have it (one line says which methods it does not apply to)
    gradients: int | None = None  # OBS: per-example gradients in the Fisher
    batches: int | None = None  # layer-wise methods: calibration batches
    grad_batch_size: int = 8
    block_size: int | None = None  # OBS and magnitude: weights per block
    fisher_damping: float | None = None  # OBS: absolute damping of the Fisher
    rel_damp: float | None = None  # SparseGPT, OBC: damping of H, a fraction of its mean diagonal
    recomputations: int | None = None  # OBS: gradient collections per pruning step
    seed: int = 0
    progress: bool = True
    task: str | None = None  # None: inferred from the data and the model
    per_layer: bool = False  # magnitude and Fisher methods per layer (layer-wise ones always are)
    # every point is repeated over this many calibration (one-shot) or fine-tuning (gradual)
    # seeds: seed, seed + 1, ...; the dense model is the same for all
    seeds: int = 1
    speed_reps: int = 5  # timed forwards per format for latency (0: do not measure)
    #: a method every other is compared with at the same mask and target (paired difference and
    #: the share of its damage avoided); not a result key: it only changes the tables
    baseline: str | None = None

    ONESHOT_DEFAULTS = {
        "params": ["__ALL_PRUNABLE__"],
        "gradients": 64,
        "batches": 64,
        "block_size": 32,
        "fisher_damping": 1e-7,
        "rel_damp": 0.01,
        "recomputations": 1,
    }
    #: the sweep's setting -> the parts' setting of the same name
    PART_SETTINGS = (
        "gradients", "batches", "block_size", "fisher_damping", "rel_damp", "recomputations"
    )  # fmt: skip
    # settings that change a point's result: a rerun into the same folder must match them
    RESULT_KEYS = (
        "model", "data", "seed", "max_train", "max_eval", "max_length", "finetune_epochs",
        "batch_size", "lr", "params", "gradients", "batches", "grad_batch_size", "block_size",
        "fisher_damping", "rel_damp", "recomputations", "recipe", "recipe_sha256", "task",
        "per_layer",
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

        out, used = {}, set()
        for m in self.methods:
            pipe = pipeline(m)
            have = pipe.settings()
            values = {k: self.setting(k) for k in self.PART_SETTINGS if k in have}
            used |= {k for k in values if getattr(self, k) is not None}
            skipped = [
                k for k in self.PART_SETTINGS if k not in have and getattr(self, k) is not None
            ]
            if say and skipped and self.recipe is None:
                flags = ", ".join("--" + k.replace("_", "-") for k in skipped)
                print(f"sweep: {flags} do(es) not apply to {m} (its parts have no such setting)")
            out[m] = pipe.with_settings(**values)
        unused = [k for k in self.PART_SETTINGS if getattr(self, k) is not None and k not in used]
        if unused and self.recipe is None:
            flag = "--" + unused[0].replace("_", "-")
            raise SweepError(
                f"{flag}: none of --methods ({', '.join(self.methods)}) has this setting"
            )
        return out

    def validate(self) -> None:
        from curvature.tasks.kinds import check_task

        check_task(self.task)
        from curvature.pruning.registry import PARTS, split_spec

        for m in self.methods:
            try:
                split_spec(m)  # names an unknown part and the nearest valid one
            except ValueError as e:
                raise SweepError(f"--methods: {e}") from None
        bad = [m for m in self.methods if m not in PRUNING_METHODS]
        if bad or not self.methods:
            raise SweepError(
                f"--methods: unknown {bad}; choose from {', '.join(METHODS)}, each with optional "
                f"parts added by + ({', '.join(PARTS)}), e.g. sparsegpt+reconstruct"
            )
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
        block = self.setting("block_size")
        if block % structure.run:
            raise SweepError(
                f"--block-size {block} is not a multiple of the {structure.name} group of {structure.run}"
            )
        if self.seeds < 1:
            raise SweepError(f"--seeds must be >= 1, got {self.seeds}")
        if self.baseline is not None and self.baseline not in self.methods:
            raise SweepError(
                f"--baseline {self.baseline!r} is not one of --methods ({', '.join(self.methods)})"
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
        if self.recipe is not None:
            out["recipe_sha256"] = hashlib.sha256(Path(self.recipe).read_bytes()).hexdigest()
        return out


def _key(p: dict) -> tuple:
    return (
        p["method"],
        p["mask"],
        p["mode"],
        round(p["target_sparsity"], 6),
        p.get("seed_index", 0),
    )


def point_name(p: dict) -> str:
    """The file name (no suffix) of a point's predictions."""
    if p["method"] == "dense":
        return "dense"
    mask = p["mask"].replace(":", "-")
    return f"{p['method']}_{mask}_{p['mode']}_{p['target_sparsity']:g}_seed{p.get('seed_index', 0)}"


def load_points(folder: Path) -> list[dict]:
    path = folder / "points.jsonl"
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                points.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that point reruns
    return points


def run_sweep(cfg: SweepConfig) -> list[dict]:
    from curvature.cli.jobs import load_for_job
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
    done = {_key(p) for p in points}

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
    for method in cfg.methods:
        # one-shot pruning that reads no data (magnitude) gives the same model for every seed
        repeats = cfg.seeds if mode == "gradual" or PRUNING_METHODS[method].needs_data else 1
        for s in cfg.sparsities:
            for k in range(repeats):
                key = (method, parse_mask(cfg.mask).name, mode, round(s, 6), k)
                if key in done:
                    continue
                point = _run_point(cfg, method, s, mode, task, dense_dir, model_loss, k)
                _append(out, point, points)
    render(out, points)
    return points


METRICS = ("accuracy", "f1", "exact_match", "perplexity", "loss")  # table columns, in order


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

    from curvature.cli.jobs import training_args

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
        from curvature.cli.jobs import PruneJob, run_prune
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


def render(
    folder: str | Path, points: list[dict] | None = None, baseline: str | None = None
) -> None:
    """Write results.csv|json|md, pies.csv, the plots and report.html from the points and the
    saved predictions (intervals, seeds, PIEs and calibration are computed here). ``baseline``:
    a method to compare every other with (default: the one ``sweep.json`` records, if any)."""
    from curvature.cli import report

    folder = Path(folder)
    points = load_points(folder) if points is None else points
    if not points:
        raise SweepError(f"{folder} has no finished sweep points (points.jsonl)")
    if baseline is None and (folder / "sweep.json").is_file():
        baseline = json.loads((folder / "sweep.json").read_text()).get("baseline")
    if baseline is not None and not any(p["method"] == baseline for p in points):
        raise SweepError(
            f"--baseline {baseline!r}: no point of that method in {folder}; methods there: "
            f"{', '.join(sorted({p['method'] for p in points}))}"
        )
    rows = aggregate(folder, points, baseline)
    with open(folder / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns(rows), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (folder / "results.json").write_text(json.dumps(rows, indent=2))
    (folder / "results.md").write_text(markdown_table(rows))
    plot(rows, folder / "accuracy_vs_sparsity.png")
    report.write_sweep_report(folder, rows, points)


def _groups(points: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault(_key(p)[:4], []).append(p)
    for pts in groups.values():
        pts.sort(key=lambda p: p.get("seed_index", 0))
    return groups


def load_units(folder: Path, p: dict):
    """The saved units of a point, or None (points written before predictions were kept)."""
    from curvature.tasks.stats import read_units

    path = Path(folder) / "predictions" / f"{point_name(p)}.csv"
    return read_units(path) if path.is_file() else None


LOWER_IS_BETTER = ("loss", "perplexity")


def aggregate(folder: Path, points: list[dict], baseline: str | None = None) -> list[dict]:
    """One row per method, mask, mode and target: the metrics' mean over seeds, their spread
    (``m_std``), 95% bootstrap intervals (``m_ci_low``/``m_ci_high``) and the paired difference
    against dense (``m_delta`` with its interval), ECE and the count of PIEs. With ``baseline``
    (a method), every other method's row at the same mask, mode and target also gets the paired
    difference against it (``m_vs_base`` with ``_ci_low``/``_ci_high``) and the share of the
    baseline's damage it avoids (``m_gap_closed`` with its interval, ``baseline`` naming it)."""
    import statistics

    from curvature.tasks import stats

    groups = _groups(points)
    dense_pts = groups.get(("dense", "-", "-", 0.0))
    dense_units = load_units(folder, dense_pts[0]) if dense_pts else None
    rows = []
    for pts in groups.values():
        row = {k: v for k, v in pts[0].items() if k not in ("seed_index", "seed")}
        row["seeds"] = len(pts)
        if pts[0].get("seed") is not None:
            row["seed_list"] = " ".join(str(p["seed"]) for p in pts)
        numeric = {k for p in pts for k, v in p.items() if isinstance(v, (int, float))}
        for k in numeric - {"seed_index", "seed", "target_sparsity"}:
            vals = [p[k] for p in pts if isinstance(p.get(k), (int, float))]
            if vals:
                row[k] = statistics.mean(vals)
        units = [load_units(folder, p) for p in pts]
        units = units if all(u is not None for u in units) else None
        for m in METRICS:
            if m not in row:
                continue
            if len(pts) > 1:
                row[f"{m}_std"] = statistics.stdev(p[m] for p in pts)
            if units and stats.has_metric(units[0], m):
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = stats.interval(units, m)
                if dense_units is not None and row["method"] != "dense":
                    d, lo, hi = stats.paired_interval(units, dense_units, m)
                    row[f"{m}_delta"], row[f"{m}_delta_ci_low"], row[f"{m}_delta_ci_high"] = (
                        d,
                        lo,
                        hi,
                    )
        if units and "confidence" in units[0]:
            row["ece"] = statistics.mean(stats.ece(u["confidence"], u["correct"]) for u in units)
            if dense_units is not None and row["method"] != "dense":
                row["pies"] = len(stats.pies(units, [dense_units]))
        rows.append(row)
    if baseline is not None:
        _against_baseline(folder, groups, rows, baseline, dense_units)
    return sorted(
        rows, key=lambda r: (r["method"] != "dense", r["mode"], r["method"], r["target_sparsity"])
    )


def _reads_data(method: str) -> bool:
    return method not in PRUNING_METHODS or PRUNING_METHODS[method].needs_data


def _against_baseline(folder, groups, rows, baseline, dense_units) -> None:
    from curvature.tasks import stats

    def units_of(key, seeds):
        pts = [p for p in groups.get(key, []) if p.get("seed_index", 0) in seeds]
        if not pts:
            return None
        u = [load_units(folder, p) for p in pts]
        return u if all(x is not None for x in u) else None

    for row in rows:
        if row["method"] in ("dense", baseline):
            continue
        key = (row["method"], row["mask"], row["mode"], round(row["target_sparsity"], 6))
        bkey = (baseline, *key[1:])
        # the seeds both have: each comparison on the same calibration draws; a method that
        # reads no data (one run, the same model for every seed) pairs with all of the other's
        mine_seeds = {p.get("seed_index", 0) for p in groups.get(key, [])}
        base_seeds = {p.get("seed_index", 0) for p in groups.get(bkey, [])}
        if not _reads_data(row["method"]):
            seeds = base_seeds
        elif not _reads_data(baseline):
            seeds = mine_seeds
        else:
            seeds = mine_seeds & base_seeds
            mine_seeds = base_seeds = seeds
        mine = units_of(key, mine_seeds)
        base = units_of(bkey, base_seeds)
        if base is None or mine is None:
            continue
        row["baseline"] = baseline
        row["baseline_seeds"] = len(seeds)
        for m in METRICS:
            if m not in row or not stats.has_metric(mine[0], m):
                continue
            d, lo, hi = stats.paired_interval(mine, base, m)
            row[f"{m}_vs_base"], row[f"{m}_vs_base_ci_low"], row[f"{m}_vs_base_ci_high"] = (
                d,
                lo,
                hi,
            )
            if dense_units is not None:
                g, glo, ghi = stats.gap_interval(mine, base, dense_units, m)
                row[f"{m}_gap_closed"] = g
                row[f"{m}_gap_closed_ci_low"], row[f"{m}_gap_closed_ci_high"] = glo, ghi


def _metrics_of(rows: list[dict]) -> list[str]:
    return [m for m in METRICS if any(m in r for r in rows)]


def columns(rows: list[dict]) -> list[str]:
    """``results.csv``'s columns: the point, every metric with its spread, interval and paired
    difference against dense, calibration and PIEs, size and measured speed, cost."""
    present = {k for r in rows for k in r}
    out = ["method", "mask", "mode", "target_sparsity", "sparsity", "seeds"]
    for m in _metrics_of(rows):
        for suffix in (
            "",
            "_std",
            "_ci_low",
            "_ci_high",
            "_delta",
            "_delta_ci_low",
            "_delta_ci_high",
            "_vs_base",
            "_vs_base_ci_low",
            "_vs_base_ci_high",
            "_gap_closed",
            "_gap_closed_ci_low",
            "_gap_closed_ci_high",
        ):
            if suffix == "" or m + suffix in present:
                out.append(m + suffix)
    tail = ["baseline", "ece", "pies", "params_kept", "dense_bytes", "compressed_bytes"]
    tail += sorted(k for k in present if k.startswith(("latency_ms_", "throughput_")))
    tail += ["speed_batch", "speed_seq_len", "speed_device", "prune_seconds", "peak_memory_mb"]
    return out + [c for c in tail if c in present or c in ("dense_bytes", "compressed_bytes")]


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def verdict(row: dict, m: str) -> str:
    """``better``/``worse`` than dense when the paired interval excludes zero, else ``within
    noise``."""
    lo, hi = row.get(f"{m}_delta_ci_low"), row.get(f"{m}_delta_ci_high")
    if lo is None:
        return ""
    if lo <= 0 <= hi:
        return "within noise"
    up = lo > 0
    return "worse" if up == (m in LOWER_IS_BETTER) else "better"


def cell(row: dict, m: str) -> str:
    """``value [low, high]`` (and ``+- std`` over seeds)."""
    if m not in row:
        return "-"
    text = _num(row[m])
    if f"{m}_ci_low" in row:
        text += f" [{_num(row[f'{m}_ci_low'])}, {_num(row[f'{m}_ci_high'])}]"
    if f"{m}_std" in row:
        text += f" +- {_num(row[f'{m}_std'])}"
    return text


def delta_cell(row: dict, m: str) -> str:
    if f"{m}_delta" not in row:
        return "-"
    return (
        f"{row[f'{m}_delta']:+.4f} [{row[f'{m}_delta_ci_low']:+.4f}, "
        f"{row[f'{m}_delta_ci_high']:+.4f}] {verdict(row, m)}"
    )


def base_cells(row: dict, m: str) -> str:
    """``difference [CI] verdict | share of the baseline's damage avoided [CI]``."""
    if f"{m}_vs_base" not in row:
        return "- | - | "
    lo, hi = row[f"{m}_vs_base_ci_low"], row[f"{m}_vs_base_ci_high"]
    if lo <= 0 <= hi:
        word = "within noise"
    else:
        word = "worse" if (lo > 0) == (m in LOWER_IS_BETTER) else "better"
    text = f"{_num(row[f'{m}_vs_base'])} [{_num(lo)}, {_num(hi)}] {word} | "
    if f"{m}_gap_closed" in row:
        g, glo, ghi = (row[f"{m}_gap_closed{s}"] for s in ("", "_ci_low", "_ci_high"))
        text += f"{g:.0%} [{glo:.0%}, {ghi:.0%}] | "
    else:
        text += "- | "
    return text


def markdown_table(rows: list[dict]) -> str:
    names = _metrics_of(rows)
    main = rows[0].get("metric", names[0] if names else "accuracy")
    others = [n for n in names if n != main]
    base = next((r["baseline"] for r in rows if r.get("baseline")), None)
    has_speed = any("latency_ms_dense" in r for r in rows)
    has_cls = any("ece" in r for r in rows)
    head = (
        f"| method | mask | mode | target | reached | seeds | {main.replace('_', ' ')} [95% CI] | "
        f"vs dense, paired [95% CI] | "
        + (
            f"vs {base}, paired [95% CI] | share of {base}'s damage avoided [95% CI] | "
            if base
            else ""
        )
        + "".join(f"{n.replace('_', ' ')} | " for n in others)
        + ("ECE | PIEs | " if has_cls else "")
        + "size (compressed) | "
        + ("latency ms (dense / CSR) | " if has_speed else "")
        + "prune s | peak MB |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        peak = f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") else "-"
        ece = f"{r['ece']:.3f}" if "ece" in r else "-"
        pies = str(r["pies"]) if "pies" in r else "-"
        speed = ""
        if has_speed:
            d, c = r.get("latency_ms_dense"), r.get("latency_ms_csr")
            speed = (f"{d:.0f}" if d else "-") + (f" / {c:.0f}" if c else "") + " | "
        lines.append(
            f"| {r['method']} | {r['mask']} | {r['mode']} | {r['target_sparsity']:.2f} | "
            f"{r['sparsity']:.4f} | {r.get('seeds', 1)} | {cell(r, main)} | {delta_cell(r, main)} | "
            + (base_cells(r, main) if base else "")
            + "".join(f"{cell(r, n)} | " for n in others)
            + (f"{ece} | {pies} | " if has_cls else "")
            + f"{r['compressed_bytes'] / 2**20:.1f} MB "
            f"({r['compressed_bytes'] / r['dense_bytes']:.0%}) | {speed}{r['prune_seconds']:.0f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def _curves(rows):
    curves: dict[tuple, list] = {}
    for r in rows:
        if r["method"] != "dense":
            curves.setdefault((r["method"], r["mask"], r["mode"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["sparsity"]) for k, v in sorted(curves.items())}


def plot(rows: list[dict], path: Path, x: str = "sparsity") -> None:
    """The task's metric (with its 95% interval as error bars) against ``x``: ``sparsity``,
    ``size`` (the compressed checkpoint, MB) or ``latency`` (measured, ms, dense format and CSR
    where measured)."""
    # A Figure of its own (no pyplot): the caller's backend and open figures stay untouched.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    dense = [r for r in rows if r["method"] == "dense"]
    metric = rows[0].get("metric", "accuracy")  # points of sweeps before tasks: accuracy
    scale = 100 if metric == "accuracy" else 1

    def xs(pts, fmt="dense"):
        if x == "sparsity":
            return [100 * r["sparsity"] for r in pts]
        if x == "size":
            return [r["compressed_bytes"] / 2**20 for r in pts]
        return [r.get(f"latency_ms_{fmt}", float("nan")) for r in pts]

    def err(pts):
        if not all(f"{metric}_ci_low" in r for r in pts):
            return None
        return [
            [scale * (r[metric] - r[f"{metric}_ci_low"]) for r in pts],
            [scale * (r[f"{metric}_ci_high"] - r[metric]) for r in pts],
        ]

    fmts = ["dense", "csr"] if x == "latency" else ["dense"]
    for (method, mask, mode), pts in _curves(rows).items():
        for fmt in fmts:
            if x == "latency" and not any(f"latency_ms_{fmt}" in r for r in pts):
                continue
            label = f"{method} ({mask}, {mode})" + (f", {fmt}" if x == "latency" else "")
            ax.errorbar(
                xs(pts, fmt), [scale * r[metric] for r in pts], yerr=err(pts), marker="o",
                capsize=3, label=label, linestyle="-" if fmt == "dense" else ":",
            )  # fmt: skip
    if dense:
        d = dense[0]
        if x == "sparsity":
            ax.axhline(scale * d[metric], color="gray", linestyle="--", label="dense")
            if f"{metric}_ci_low" in d:
                ax.axhspan(scale * d[f"{metric}_ci_low"], scale * d[f"{metric}_ci_high"],
                           color="gray", alpha=0.12, label="dense 95% CI")  # fmt: skip
        else:
            dx = xs([d])[0]
            if dx == dx:  # not NaN
                ax.plot([dx], [scale * d[metric]], marker="*", markersize=12, color="black",
                        linestyle="", label="dense")  # fmt: skip
    xlabel = {
        "sparsity": "sparsity of the pruned weights (%)",
        "size": "compressed checkpoint on disk (MB)",
        "latency": "measured latency of one batch (ms)",
    }[x]
    if x == "latency" and rows and rows[0].get("speed_batch"):
        r0 = rows[0]
        xlabel += f", batch {r0['speed_batch']} x {r0['speed_seq_len']} tokens, {r0.get('speed_device', 'cpu')}"
    ax.set_xlabel(xlabel, fontsize=8 if x == "latency" else None)
    label = {"accuracy": "accuracy (%)", "f1": "F1", "perplexity": "perplexity"}.get(metric, metric)
    ax.set_ylabel(f"validation {label}")
    title = {
        "sparsity": "at each sparsity",
        "size": "against size on disk",
        "latency": "against latency",
    }[x]
    ax.set_title(f"{label.split(' ')[0].capitalize()} kept {title} (bars: 95% CI)")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_baseline(rows: list[dict], path: Path) -> bool:
    """Each method's share of the baseline's damage avoided (95% interval as error bars), one
    group of bars per mask and target; ``False`` (nothing written) without baseline rows."""
    from matplotlib.figure import Figure

    metric = rows[0].get("metric", "accuracy")
    key = f"{metric}_gap_closed"
    have = [r for r in rows if key in r and r[key] == r[key]]
    if not have:
        return False
    base = have[0]["baseline"]
    settings = sorted({(r["mask"], r["mode"], r["target_sparsity"]) for r in have},
                      key=lambda k: (k[0] != "unstructured", k[0], k[1], k[2]))  # fmt: skip
    methods = sorted({r["method"] for r in have})
    fig = Figure(figsize=(7.2, 0.9 + 0.32 * len(methods) * len(settings)), dpi=120)
    ax = fig.subplots()
    ys, labels = [], []
    y = 0.0
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for st in settings:
        for m in methods:
            r = next((r for r in have if (r["mask"], r["mode"], r["target_sparsity"]) == st
                      and r["method"] == m), None)  # fmt: skip
            if r is None:
                continue
            v, lo, hi = (100 * r[f"{key}{s}"] for s in ("", "_ci_low", "_ci_high"))
            ax.barh(y, v, color=colors[m], xerr=[[v - lo], [hi - v]], capsize=3)
            ys.append(y)
            mask = st[0] if st[0] != "unstructured" else f"{st[2]:.0%}"
            labels.append(f"{m}  ({mask}, {st[1]}, {r.get('seeds', 1)} seed(s))")
            y += 1
        y += 0.6
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"share of {base}'s {metric} damage (against dense) avoided, % (bars: 95% CI)")
    ax.set_title(f"Against {base} at the same mask and target", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


__all__ = ["SweepConfig", "plot_baseline", "render", "run_sweep"]
