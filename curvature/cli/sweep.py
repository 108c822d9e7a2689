"""Sparsity-accuracy sweeps: every method at every sparsity on the same model, split and seed.

Layout of a sweep folder::

    DIR/dense/                 the dense reference (fine-tuned here unless --finetune-epochs 0)
    DIR/points.jsonl           one line per finished point (the resume log)
    DIR/results.csv|json|md    the table, rewritten after every point
    DIR/accuracy_vs_sparsity.png

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

COLUMNS = [
    "method",
    "mask",
    "mode",
    "target_sparsity",
    "sparsity",
    "accuracy",
    "loss",
    "dense_bytes",
    "compressed_bytes",
    "prune_seconds",
    "peak_memory_mb",
]
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
    num_grads: int | None = None
    grad_batch_size: int = 8
    block_size: int | None = None
    damp: float | None = None
    num_recomputations: int | None = None
    seed: int = 0
    progress: bool = True
    task: str | None = None  # None: inferred from the data and the model
    per_layer: bool = False  # magnitude and Fisher methods per layer (layer-wise ones always are)

    ONESHOT_DEFAULTS = {
        "params": ["__ALL_PRUNABLE__"],
        "num_grads": 64,
        "block_size": 32,
        "damp": 1e-7,
        "num_recomputations": 1,
    }
    # settings that change a point's result: a rerun into the same folder must match them
    RESULT_KEYS = (
        "model", "data", "seed", "max_train", "max_eval", "max_length", "finetune_epochs",
        "batch_size", "lr", "params", "num_grads", "grad_batch_size", "block_size", "damp",
        "num_recomputations", "recipe", "recipe_sha256", "task", "per_layer",
    )  # fmt: skip

    def setting(self, name: str):
        """A pruning setting as it applies: the value given, else the one-shot default."""
        value = getattr(self, name)
        return self.ONESHOT_DEFAULTS[name] if value is None else value

    def validate(self) -> None:
        from curvature.tasks.kinds import check_task

        check_task(self.task)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise SweepError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
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
        for name in ("num_grads", "block_size", "num_recomputations"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SweepError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.damp is not None and not self.damp > 0:
            raise SweepError(f"--damp must be > 0, got {self.damp}")
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
    return (p["method"], p["mask"], p["mode"], round(p["target_sparsity"], 6))


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
    if ("dense", "-", "-", 0.0) not in done:
        ev = task.evaluate(dense_model, progress=cfg.progress, desc="eval dense")
        _append(
            out,
            {
                "method": "dense",
                "mask": "-",
                "mode": "-",
                "target_sparsity": 0.0,
                "sparsity": 0.0,
                **_ev(ev, task),
                **_sizes(dense_model, out),
                "prune_seconds": 0.0,
                "peak_memory_mb": None,
            },
            points,
        )

    mode = "gradual" if cfg.recipe else "oneshot"
    for method in cfg.methods:
        for s in cfg.sparsities:
            key = (method, parse_mask(cfg.mask).name, mode, round(s, 6))
            if key in done:
                continue
            point = _run_point(cfg, method, s, mode, task, dense_dir, model_loss)
            _append(out, point, points)
    render(out, points)
    return points


METRICS = ("accuracy", "f1", "exact_match", "perplexity", "loss")  # table columns, in order


def _ev(ev: dict, task) -> dict:
    """A point's metrics: the task's (see :data:`METRICS`), and which one it is judged by."""
    return {"metric": task.metric, **{k: ev[k] for k in METRICS if k in ev}}


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


def _run_point(cfg, method, s, mode, task, dense_dir, model_loss) -> dict:
    from curvature.cli.utils import peak_memory_bytes, reset_peak_memory
    from curvature.pruning import prune
    from curvature.tasks.kinds import load_model

    reset_peak_memory()
    start = time.perf_counter()
    if mode == "oneshot":
        model = load_model(task.task, str(dense_dir))
        from curvature.integrations.hf import grad_loader

        # under torch.distributed each rank's shard of the batches (a DistributedSampler)
        grads = grad_loader(task.train, cfg.grad_batch_size, task.collator, cfg.seed)
        fisher = (
            {}  # the layer-wise methods: calibration batches only (their damping is relative)
            if PRUNING_METHODS[method].layerwise
            else {
                "block_size": cfg.setting("block_size"),
                "damp": cfg.setting("damp"),
                "num_recomputations": cfg.setting("num_recomputations"),
                "global_sparsity": not cfg.per_layer,
            }
        )
        report = prune(
            model,
            grads,
            loss_fn=model_loss,
            sparsity=s,
            method=method,
            mask=cfg.mask,
            params=cfg.setting("params"),
            num_grads=cfg.setting("num_grads"),
            progress=cfg.progress,
            **fisher,
        )
        reached = report.global_sparsity
    else:
        from curvature.cli.jobs import PruneJob, run_prune
        from curvature.recipes import load_recipe

        recipe = _recipe_for(load_recipe(cfg.recipe), method, s, cfg)
        tmp = Path(cfg.output) / f".point-{method}-{s}"
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
            seed=cfg.seed,
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
    return {
        "method": method,
        "mask": parse_mask(cfg.mask).name,
        "mode": mode,
        "target_sparsity": s,
        "sparsity": reached,
        **_ev(ev, task),
        **_sizes(model, Path(cfg.output)),
        "prune_seconds": seconds,
        "peak_memory_mb": peak / 2**20 if peak else None,
    }


def _recipe_for(recipe, method, sparsity, cfg: SweepConfig):
    """The recipe with its pruning modifiers switched to ``method`` at ``sparsity``, with every
    pruning setting the sweep was given (params, num_grads, block size, damp, recomputations)."""
    from curvature.pruning import METHODS
    from curvature.recipes.schema import (
        LayerwisePruningModifier,
        MagnitudePruningModifier,
        OBSPruningModifier,
        _Pruning,
    )

    recipe = copy.deepcopy(recipe)
    mods = []
    for m in recipe.modifiers:
        if isinstance(m, _Pruning):
            fields = m.model_dump()
            fields.update(
                final_sparsity=sparsity,
                init_sparsity=min(m.init_sparsity, sparsity),
                mask_type=cfg.mask,
            )
            given = {
                "params": cfg.params,
                "num_grads": cfg.num_grads,
                "fisher_block_size": cfg.block_size,
                "damp": cfg.damp,
                "num_recomputations": cfg.num_recomputations,
            }
            fields.update({k: v for k, v in given.items() if v is not None})
            if cfg.per_layer:
                fields["global_sparsity"] = False
            if METHODS[method].layerwise:
                # --damp is the Fisher's damping: the layer Hessian keeps its own default
                fields.pop("damp", None)
                fields.update(num_calibration_batches=cfg.num_grads or 128)
                base = {
                    k: v
                    for k, v in fields.items()
                    if k in LayerwisePruningModifier.model_fields
                    and k not in ("method_name", "global_sparsity")
                }
                m = LayerwisePruningModifier(**base, global_sparsity=False, method_name=method)
            elif not METHODS[method].needs_gradients:
                fields = {
                    k: v for k, v in fields.items() if k in MagnitudePruningModifier.model_fields
                }
                m = MagnitudePruningModifier(**fields)
            else:
                base = {k: v for k, v in fields.items() if k in OBSPruningModifier.model_fields}
                m = OBSPruningModifier(**{**base, "method_name": method})
        mods.append(m)
    recipe.modifiers = mods
    return recipe


def render(folder: str | Path, points: list[dict] | None = None) -> None:
    """Write results.csv, results.json, results.md and the plot from the points."""
    folder = Path(folder)
    points = load_points(folder) if points is None else points
    if not points:
        raise SweepError(f"{folder} has no finished sweep points (points.jsonl)")
    rows = sorted(
        points, key=lambda p: (p["method"] != "dense", p["mode"], p["method"], p["target_sparsity"])
    )
    with open(folder / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns(rows), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (folder / "results.json").write_text(json.dumps(rows, indent=2))
    (folder / "results.md").write_text(markdown_table(rows))
    plot(rows, folder / "accuracy_vs_sparsity.png")


def _metrics_of(rows: list[dict]) -> list[str]:
    return [m for m in METRICS if any(m in r for r in rows)]


def columns(rows: list[dict]) -> list[str]:
    """``results.csv``'s columns: :data:`COLUMNS` with the metrics of the sweep's task."""
    i = COLUMNS.index("accuracy")
    return [*COLUMNS[:i], *_metrics_of(rows), *COLUMNS[i + 2 :]]


def markdown_table(rows: list[dict]) -> str:
    names = _metrics_of(rows)
    lines = [
        "| method | mask | mode | target | reached | "
        + " | ".join(n.replace("_", " ") for n in names)
        + " | size (compressed) | prune s | peak MB |",
        "|---" * (8 + len(names)) + "|",
    ]
    for r in rows:
        peak = f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") else "-"
        vals = " | ".join(f"{r[n]:.4f}" if n in r else "-" for n in names)
        lines.append(
            f"| {r['method']} | {r['mask']} | {r['mode']} | {r['target_sparsity']:.2f} | {r['sparsity']:.4f} | "
            f"{vals} | {r['compressed_bytes'] / 2**20:.1f} MB "
            f"({r['compressed_bytes'] / r['dense_bytes']:.0%}) | {r['prune_seconds']:.0f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    # A Figure of its own (no pyplot): the caller's backend and open figures stay untouched.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    dense = [r for r in rows if r["method"] == "dense"]
    metric = rows[0].get("metric", "accuracy")  # points of sweeps before tasks: accuracy
    scale = 100 if metric == "accuracy" else 1
    curves: dict[tuple, list] = {}
    for r in rows:
        if r["method"] != "dense":
            curves.setdefault((r["method"], r["mask"], r["mode"]), []).append(r)
    for (method, mask, mode), pts in sorted(curves.items()):
        pts = sorted(pts, key=lambda r: r["sparsity"])
        ax.plot(
            [100 * r["sparsity"] for r in pts],
            [scale * r[metric] for r in pts],
            marker="o",
            label=f"{method} ({mask}, {mode})",
        )
    if dense:
        ax.axhline(scale * dense[0][metric], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of the pruned weights (%)")
    label = {"accuracy": "accuracy (%)", "f1": "F1", "perplexity": "perplexity"}.get(metric, metric)
    ax.set_ylabel(f"validation {label}")
    ax.set_title(f"{label.split(' ')[0].capitalize()} kept at each sparsity")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


__all__ = ["SweepConfig", "render", "run_sweep"]
