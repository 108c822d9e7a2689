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
sys.path.insert(0, str(ROOT / "scripts"))
from _bench import run_child  # noqa: E402


def prune(args, recipe: str, sets: dict, out: Path, extra=()) -> dict:
    """One ``curvature prune`` run in a child process; its metrics with time and peak memory."""
    argv = ["prune", str(ROOT / "recipes" / recipe), "--model", args.dense, "--data", args.data]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    argv += ["--output", str(out), "--no-progress", "--overwrite", *extra]
    rc, usage = run_child(argv)
    if rc:
        raise SystemExit(f"curvature {' '.join(argv)} failed with exit code {rc}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"argv": argv, **usage, "metrics": metrics}


def measure(args) -> None:
    """Time every saved model of ``--raw`` and the dense model, alone, in this one process: the
    median of ``--reps`` forwards at batch 16 x 128 and 1 x 128, the models interleaved per round
    so that drift in the machine's speed hits all of them alike."""
    import torch

    from curvature.integrations.latency import measure_model
    from curvature.integrations.structured import load_structured

    points = [json.loads(line) for line in open(args.raw)]
    # every model loaded the same way (weights copied into fresh memory), the dense one included
    models = {"dense": load_structured(args.dense).eval()}
    folders = {"dense": Path(args.dense)}
    for p in points:
        out = p["argv"][p["argv"].index("--output") + 1]
        models[out] = load_structured(out).eval()
        folders[out] = Path(out)
    gen = torch.Generator().manual_seed(0)
    vocab = models["dense"].get_input_embeddings().num_embeddings
    rows = []
    for batch_size in (16, 1):
        ids = torch.randint(0, vocab, (batch_size, 128), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        times: dict[str, list] = {k: [] for k in models}
        for _ in range(args.rounds):
            for key, model in models.items():
                times[key].append(measure_model(model, batch, reps=args.reps))
        for key, ts in times.items():
            ts = sorted(ts)
            size = sum(f.stat().st_size for f in folders[key].glob("*.safetensors"))
            rows.append({"model": key, "batch_size": batch_size, "sequence_length": 128,
                         "threads": torch.get_num_threads(), "ms": ts[len(ts) // 2], "rounds": ts,
                         "bytes": size})  # fmt: skip
            print(key, batch_size, f"{ts[len(ts) // 2]:.1f} ms")
    with open(args.measure, "w") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense", required=True, help="the fine-tuned dense model folder")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--speedups", default="1.5,2,3,4")
    ap.add_argument("--methods", default="obs," + ",".join(BASELINES))
    ap.add_argument("--recover", action="store_true", help="fine-tune with distillation after")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument(
        "--combined",
        default="",
        help="'SPEEDUP:SPARSITY' points, comma-separated: structured then OBS, and OBS alone",
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

    for speedup in [float(s) for s in args.speedups.split(",") if s]:
        out = work / f"obs-{speedup:g}x-{epochs:g}"
        base = {"label": f"{speedup:g}x", "speedup": speedup, "epochs": epochs}
        point = prune(
            args, "structured-minilm.yaml", {"speedup": speedup, "epochs": epochs}, out, mode
        )
        if "obs" in methods:
            record({**base, "method": "obs", **point})
        targets = point["metrics"]["structured"]["targets"]
        for method in [m for m in methods if m != "obs"]:
            sets = {"method": method, "epochs": epochs, "heads": targets.get("heads", 0.0)}
            sets["neurons"] = targets.get("neurons", 0.0)
            out = work / f"{method}-{speedup:g}x-{epochs:g}"
            record(
                {
                    **base,
                    "method": method,
                    **prune(args, "structured-minilm-sizes.yaml", sets, out, mode),
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
