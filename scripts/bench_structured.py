"""Structured pruning of MiniLM on bbc-news: every method at the sizes of each measured speed-up.

For each speed-up, structured OBS plans the sizes from the latency table measured here
(``recipes/structured-minilm.yaml``); the three baselines then remove the same numbers of heads and
neurons (``recipes/structured-minilm-sizes.yaml``), so every method is compared at the same
measured latency. ``--recover`` also fine-tunes each pruned model for ``--epochs`` with
distillation from the dense model, beside the dense model trained for the same steps
(``--dense-baseline``). ``--combined`` adds structured-then-unstructured points. Each run is one
``curvature prune`` in its own process; its ``metrics.json``, peak memory and wall time are
appended to ``--raw`` (JSON lines), from which ``scripts/tables.py structured`` makes the tables.

    python scripts/bench_structured.py --dense runs/dense-minilm --speedups 1.5,2,3,4 \\
        --raw docs/structured-minilm.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("magnitude", "activation", "fluctuation", "taylor")
#: per model: the speed-up recipe, the fixed-sizes recipe and the job's options (the decoder's are
#: the project's perplexity protocol, docs/results-smollm2.md; its latency is prefill at 1 x 512)
SETUPS = {
    "minilm": ("structured-minilm.yaml", "structured-minilm-sizes.yaml", []),
    "smollm2": (
        "structured-smollm2.yaml",
        "structured-smollm2-sizes.yaml",
        [
            "--task",
            "causal-lm",
            "--max-train",
            "200",
            "--max-eval",
            "40",
            "--max-length",
            "512",
            "--batch-size",
            "8",
        ],
    ),  # fmt: skip
}
#: per model: the recipe that removes given sizes at once and then fine-tunes with distillation
#: (``--sizes`` with ``--recover``)
RECOVER = {"smollm2": "structured-smollm2-recover.yaml"}
sys.path.insert(0, str(ROOT / "scripts"))
from _bench import run_child  # noqa: E402


def prune(args, recipe: str, sets: dict, out: Path, extra=()) -> dict:
    """One ``curvature prune`` run in a child process; its metrics with time and peak memory."""
    argv = ["prune", str(ROOT / "recipes" / recipe), "--model", args.dense, "--data", args.data]
    argv += SETUPS[args.setup][2]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    argv += ["--output", str(out), "--no-progress", "--overwrite", *extra]
    rc, usage = run_child(argv)
    if rc:
        raise SystemExit(f"curvature {' '.join(argv)} failed with exit code {rc}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"argv": argv, **usage, "metrics": metrics}


#: the latencies measured per setup: (batch, tokens); the decoder's is one prefill of 512 tokens
MEASURED = {"minilm": [(16, 128), (1, 128)], "smollm2": [(1, 512)]}


def measure(args) -> None:
    """Time every saved model of ``--raw`` and the dense model, alone, in this one process: the
    median of ``--reps`` forwards at batch 16 x 128 and 1 x 128, the models interleaved per round
    so that drift in the machine's speed hits all of them alike."""
    import torch

    from curvature.integrations.latency import measure_model
    from curvature.integrations.structured import load_structured

    points = [json.loads(line) for line in open(args.raw)]
    dense = Path(args.dense)
    if not dense.is_dir():  # a model name (smollm2): saved once, to be loaded like the others
        from curvature.tasks.kinds import load_model

        dense = Path(args.work) / f"dense-{args.setup}"
        if not dense.is_dir():
            load_model("causal-lm", args.dense).save_pretrained(dense)
    # every model loaded the same way (weights copied into fresh memory), the dense one included
    models = {"dense": load_structured(dense).eval()}
    folders = {"dense": dense}
    for p in points:
        out = p["argv"][p["argv"].index("--output") + 1]
        models[out] = load_structured(out).eval()
        folders[out] = Path(out)
    gen = torch.Generator().manual_seed(0)
    vocab = models["dense"].get_input_embeddings().num_embeddings
    rows = []
    for batch_size, length in MEASURED[args.setup]:
        ids = torch.randint(0, vocab, (batch_size, length), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        times: dict[str, list] = {k: [] for k in models}
        for _ in range(args.rounds):
            for key, model in models.items():
                times[key].append(measure_model(model, batch, reps=args.reps))
        for key, ts in times.items():
            ts = sorted(ts)
            size = sum(f.stat().st_size for f in folders[key].glob("*.safetensors"))
            rows.append({"model": key, "batch_size": batch_size, "sequence_length": length,
                         "threads": torch.get_num_threads(), "ms": ts[len(ts) // 2], "rounds": ts,
                         "bytes": size})  # fmt: skip
            print(key, batch_size, f"{ts[len(ts) // 2]:.1f} ms")
    with open(args.measure, "w") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")


def _planned(raw: str) -> dict:
    """The sizes the one-shot obs points of an earlier run chose, by speed-up."""
    planned = {}
    for line in open(raw):
        p = json.loads(line)
        if p["method"] == "obs" and "sparsity" not in p and not p.get("gradual"):
            planned[p["speedup"]] = p["metrics"]["structured"]["targets"]
    return planned


#: the metrics a prune job pairs with its dense references (``curvature/cli/jobs.py``)
PAIRED = ("accuracy", "f1", "exact_match", "perplexity", "loss")


def pair_with_baseline(point: dict, base: Path, out: Path) -> None:
    """Make ``point`` (a job run without ``--dense-baseline``) compare first with the dense model
    of the same steps that the job in ``base`` trained, as the job itself would have: the same
    paired bootstrap over the same validation units; its comparison with the dense model before
    pruning becomes the second (``_delta_dense``), and ``dense_equal_budget_from`` names ``base``."""
    from curvature.tasks import stats

    m, ev = point["metrics"], point["metrics"]["pruned"]
    first = json.loads((base / "metrics.json").read_text())
    if first["steps"] != m["steps"] or first["epochs"] != m["epochs"]:
        raise SystemExit(
            f"{out}: {m['steps']} steps, and the dense model of {base} trained "
            f"{first['steps']}: not the same budget"
        )
    m["dense_equal_budget"] = first["dense_equal_budget"]
    reference = stats.read_units(base / "predictions" / "dense_equal_budget.csv")
    units = stats.read_units(out / "predictions" / "pruned.csv")
    if sorted(reference["id"]) != sorted(units["id"]):
        raise SystemExit(f"{out}: validated on other examples than {base}")
    for metric in [k for k in PAIRED if f"{k}_delta" in ev]:
        for end in ("", "_ci_low", "_ci_high"):
            ev[f"{metric}_delta_dense{end}"] = ev.pop(f"{metric}_delta{end}")
        d, lo, hi = stats.paired_interval(units, reference, metric)
        ev[f"{metric}_delta"], ev[f"{metric}_delta_ci_low"], ev[f"{metric}_delta_ci_high"] = (
            d,
            lo,
            hi,
        )
    if "pies" in m:  # the changed predictions count against the first reference
        m["pies"] = len(stats.pies([units], [reference]))
    m["compared_with"] = "dense_equal_budget"
    m["dense_equal_budget_from"] = str(base)


def gradual(args) -> None:
    """Every method removing the same sizes gradually, with distillation, for ``--epochs``. The
    dense model trained for the same steps (the recipe without its structure and distillation
    modifiers: the same training, seed and data order for every method and size) is trained once,
    by the first job, and every later point is paired with it (:func:`pair_with_baseline`)."""
    if not args.sizes_from or args.setup != "minilm":
        raise SystemExit("--gradual: MiniLM only, at the sizes of --sizes-from RAW")
    planned = _planned(args.sizes_from)
    base = None
    for speedup in [float(s) for s in args.speedups.split(",") if s]:
        if speedup not in planned:
            raise SystemExit(f"--sizes-from {args.sizes_from}: no obs point at {speedup:g}x")
        targets = planned[speedup]
        for method in args.methods.split(","):
            sets = {"method": method, "epochs": args.epochs, "heads": targets.get("heads", 0.0)}
            sets["neurons"] = targets.get("neurons", 0.0)
            out = Path(args.work) / f"gradual-{method}-{speedup:g}x-{args.epochs:g}"
            extra = [] if base else ["--dense-baseline"]
            point = prune(args, "structured-minilm-gradual.yaml", sets, out, extra)
            if base:
                pair_with_baseline(point, base, out)
            else:
                base = out
            point = {"label": f"{speedup:g}x gradual", "speedup": speedup, "epochs": args.epochs,
                     "gradual": True, "method": method, **point}  # fmt: skip
            with open(args.raw, "a") as fh:
                fh.write(json.dumps(point) + "\n")
            print(point["label"], method, point["metrics"]["pruned"]["accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense", required=True, help="the fine-tuned dense model folder")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--setup", choices=sorted(SETUPS), default="minilm")
    ap.add_argument("--speedups", default="1.5,2,3,4")
    ap.add_argument("--methods", default="obs," + ",".join(BASELINES))
    ap.add_argument("--recover", action="store_true", help="fine-tune with distillation after")
    ap.add_argument(
        "--gradual",
        action="store_true",
        help="remove the structures gradually during --epochs of distilled training "
        "(recipes/structured-minilm-gradual.yaml) at the sizes of --sizes-from, beside the dense "
        "model trained for the same steps",
    )
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument(
        "--combined",
        default="",
        help="'SPEEDUP:SPARSITY' points, comma-separated: structured then OBS, and OBS alone",
    )
    ap.add_argument(
        "--sizes-from",
        default=None,
        help="a raw file of an earlier run: the methods run at the sizes its obs points chose "
        "(no new plan), so that methods added later compare at the same matrices",
    )
    ap.add_argument(
        "--damp",
        type=float,
        default=None,
        help="the obs and fisher parts' damping for the --sizes-from points (default: the "
        "recipe's); the method is labelled with it",
    )
    ap.add_argument(
        "--per-block",
        action="store_true",
        help="plan the sizes block by block (uniform: false) at each --speedups, obs only",
    )
    ap.add_argument(
        "--sizes",
        default="",
        help="'HEADS:NEURONS' fractions removed per block, comma-separated: every method at "
        "these fixed sizes (no plan; the speed-up is what --measure measures)",
    )
    ap.add_argument("--work", default="runs/bench-structured")
    ap.add_argument("--raw", required=True, help="JSON lines to append to")
    ap.add_argument(
        "--measure",
        default=None,
        help="instead of pruning: time the dense model and every model of --raw here, alone, "
        "and write the latencies to this JSON lines file (scripts/tables.py reads RAW-STEM-latency.jsonl)",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.measure:
        measure(args)
        return
    if args.gradual:
        gradual(args)
        return
    if args.sizes:
        recipe, mode, epochs = SETUPS[args.setup][1], ["--oneshot"], 0.0
        if args.recover:  # removed at once, evaluated, then fine-tuned with distillation
            if args.setup not in RECOVER:
                raise SystemExit(f"--sizes --recover: no recovery recipe for --setup {args.setup}")
            recipe, mode, epochs = RECOVER[args.setup], [], args.epochs
        for item in args.sizes.split(","):
            heads, neurons = (float(v) for v in item.split(":"))
            label = f"{heads:.0%} heads, {neurons:.0%} neurons"
            for method in args.methods.split(","):
                sets = {"method": method, "heads": heads, "neurons": neurons}
                out = Path(args.work) / f"{method}-h{heads:g}-n{neurons:g}"
                if args.recover:
                    sets["epochs"] = epochs
                    out = out.with_name(f"{out.name}-recover{epochs:g}")
                point = prune(args, recipe, sets, out, mode)
                with open(args.raw, "a") as fh:
                    fh.write(json.dumps({"label": label, "speedup": None, "epochs": epochs,
                                         "method": method, **point}) + "\n")  # fmt: skip
                print(label, method, point["metrics"]["pruned"])
        return
    if args.per_block:
        for speedup in [float(s) for s in args.speedups.split(",") if s]:
            out = Path(args.work) / f"obs-per-block-{speedup:g}x"
            point = prune(args, SETUPS[args.setup][0], {"speedup": speedup, "epochs": 0.0,
                          "uniform": "false"}, out, ["--oneshot"])  # fmt: skip
            with open(args.raw, "a") as fh:
                fh.write(json.dumps({"label": f"{speedup:g}x", "speedup": speedup, "epochs": 0.0,
                                     "method": "obs, sizes per block", **point}) + "\n")  # fmt: skip
        return
    if args.setup != "minilm" and (args.recover or args.combined):
        raise SystemExit(f"--setup {args.setup}: one-shot points only (no --recover, --combined)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    epochs = args.epochs if args.recover else 0.0
    mode = ["--dense-baseline"] if args.recover else ["--oneshot"]

    def record(point: dict) -> None:
        with open(args.raw, "a") as fh:
            fh.write(json.dumps(point) + "\n")
        s = point["metrics"].get("structured", {})
        print(
            point["label"], point["method"], s.get("sizes"), point["metrics"]["pruned"]["accuracy"]
        )

    planned = _planned(args.sizes_from) if args.sizes_from else {}
    for speedup in [float(s) for s in args.speedups.split(",") if s]:
        out = work / f"obs-{speedup:g}x-{epochs:g}"
        base = {"label": f"{speedup:g}x", "speedup": speedup, "epochs": epochs}
        if speedup in planned:
            targets = planned[speedup]
        else:
            if args.sizes_from:
                raise SystemExit(f"--sizes-from {args.sizes_from}: no obs point at {speedup:g}x")
            sets = {"speedup": speedup}
            if args.setup == "minilm":
                sets["epochs"] = epochs
            point = prune(args, SETUPS[args.setup][0], sets, out, mode)
            if "obs" in methods:
                record({**base, "method": "obs", **point})
            targets = point["metrics"]["structured"]["targets"]
        for method in [m for m in methods if m != "obs"]:
            sets = {"method": method, "heads": targets.get("heads", 0.0)}
            sets["neurons"] = targets.get("neurons", 0.0)
            if args.setup == "minilm":
                sets["epochs"] = epochs
            label = method
            if args.damp is not None:
                sets["damp"] = args.damp
                label = f"{method} (damp {args.damp:g})"
            out = (
                work
                / f"{label.replace(' ', '-').replace('(', '').replace(')', '')}-{speedup:g}x-{epochs:g}"
            )
            record(
                {
                    **base,
                    "method": label,
                    **prune(args, SETUPS[args.setup][1], sets, out, mode),
                }
            )
    for item in [c for c in args.combined.split(",") if c]:
        speedup, sparsity = (float(v) for v in item.split(":"))
        out = work / f"combined-{speedup:g}x-{sparsity:g}"
        point = prune(
            args,
            "structured-minilm-obs.yaml",
            {"speedup": speedup, "sparsity": sparsity},
            out,
            ["--oneshot"],
        )
        record({"label": f"{speedup:g}x then {sparsity:.0%} OBS", "speedup": speedup, "epochs": 0.0,
                "sparsity": sparsity, "method": "obs+obs", **point})  # fmt: skip
        out = work / f"unstructured-{sparsity:g}"
        point = prune(args, "default-minilm.yaml", {"final_sparsity": sparsity}, out, ["--oneshot"])
        record({"label": f"{sparsity:.0%} OBS alone", "speedup": 1.0, "epochs": 0.0,
                "sparsity": sparsity, "method": "obs (unstructured)", **point})  # fmt: skip


if __name__ == "__main__":
    main()
