"""Compressed MiniLM in ONNX Runtime on the CPU: size, accuracy and latency against the dense model.

Each point is one ``curvature prune --oneshot`` of a committed recipe (structured OBS sizes, GPTQ or
round-to-nearest bits) in its own process, then ``curvature export --int8`` of the saved folder.
For every point this records the saved folder's size (the packed safetensors file), the accuracy
of the saved model in PyTorch (from the prune run) and of the exported model in ONNX Runtime (the
task's own evaluator on an :class:`~curvature.integrations.runtime.OnnxModel`), each with a 95%
paired interval against the dense model's predictions. Then, alone on the machine, the dense
PyTorch float32 model and every exported model are timed at 16 x 128 and 1 x 128 tokens with the
same threads, taken in turn round by round (median of ``--reps`` forwards per round, median over
rounds; each model in a fresh process of its own). Raw JSON lines go to ``--raw``;
``scripts/tables.py runtime`` makes the tables.

    python scripts/bench_runtime.py --dense runs/dense-minilm --raw docs/compressed-minilm/points.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from _bench import run_child  # noqa: E402

#: (label, recipe, --set values, export options)
POINTS = [
    ("dense, onnxruntime float32", None, {}, []),
    ("dense, onnxruntime int8 (runtime rounding)", None, {}, ["--int8"]),
    ("GPTQ 8-bit", "quantized-minilm.yaml", {}, ["--int8"]),
    ("5 heads, 480 neurons + GPTQ 8-bit", "compressed-minilm.yaml",
     {"heads": 7 / 12, "neurons": 1 - 480 / 1536}, ["--int8"]),
    ("4x sizes + GPTQ 8-bit", "compressed-minilm.yaml", {}, ["--int8"]),
    ("4x sizes + GPTQ 4-bit", "compressed-minilm.yaml", {"bits": 4}, ["--int8"]),
    ("4x sizes + RTN 4-bit", "compressed-minilm.yaml", {"bits": 4, "quantizer": "rtn"}, ["--int8"]),
    ("4x sizes, 1 epoch distilled + GPTQ 8-bit", "compressed-minilm-recover.yaml", {}, ["--int8"]),
]  # fmt: skip
#: recipes that fine-tune: run with the dense model trained for the same steps beside them
TRAINING = ("compressed-minilm-recover.yaml",)


def _run(argv: list[str]) -> dict:
    rc, usage = run_child(argv)
    if rc:
        raise SystemExit(f"curvature {' '.join(argv)} failed with exit code {rc}")
    return usage


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def build(args) -> None:
    from curvature.integrations.runtime import OnnxModel
    from curvature.tasks import stats
    from curvature.tasks.kinds import prepare

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    p = prepare(None, args.dense, args.data, max_length=128)
    dense_units = p.evaluate(p.model)["units"]
    done = {}
    if Path(args.raw).exists():
        done = {json.loads(line)["label"]: json.loads(line) for line in open(args.raw)}
    if args.reexport:  # the same saved folders, exported and scored again by the current code
        Path(args.raw).write_text("")
    for i, (label, recipe, sets, export_opts) in enumerate(POINTS):
        if label in done and not args.reexport:
            continue
        if args.reexport and label not in done:
            continue
        point: dict = {"label": label, "recipe": recipe, "sets": sets, "export": export_opts}
        folder = Path(args.dense)
        if args.reexport:
            point.update({k: v for k, v in done[label].items() if k in ("prune", "metrics")})
            folder = Path(done[label]["folder"])
        elif recipe is not None:
            folder = work / f"point-{i}"
            mode = ["--dense-baseline"] if recipe in TRAINING else ["--oneshot"]
            argv = ["prune", str(ROOT / "recipes" / recipe), "--model", args.dense, "--data",
                    args.data, *mode, "--output", str(folder), "--no-progress", "--overwrite"]  # fmt: skip
            for k, v in sets.items():
                argv += ["--set", f"{k}={v}"]
            point["prune"] = {"argv": argv, **_run(argv)}
            metrics = json.loads((folder / "metrics.json").read_text())
            keep = ("pruned", "structured", "quantized", "dense_equal_budget", "compared_with")
            point["metrics"] = {k: metrics.get(k) for k in keep}
        onnx = work / f"onnx-{i}"
        argv = ["export", str(folder), "--output", str(onnx), "--overwrite", "--no-measure",
                *export_opts]  # fmt: skip
        point["export_run"] = {"argv": argv, **_run(argv)}
        point["export_info"] = json.loads((onnx / "export.json").read_text())
        point["folder"], point["onnx"] = str(folder), str(onnx / "model.onnx")
        point["bytes"] = _size(folder)
        point["onnx_bytes"] = (onnx / "model.onnx").stat().st_size
        ev = p.evaluate(OnnxModel(onnx / "model.onnx"))
        units = ev.pop("units")
        d, lo, hi = stats.paired_interval(units, dense_units, "accuracy")
        point["onnxruntime"] = {**ev, "accuracy_delta": d, "accuracy_delta_ci": [lo, hi]}
        budget = folder / "predictions" / "dense_equal_budget.csv"
        if budget.is_file():  # a fine-tuned point: also against the dense model of its steps
            d, lo, hi = stats.paired_interval(units, stats.read_units(budget), "accuracy")
            point["onnxruntime"]["accuracy_delta_equal_budget"] = d
            point["onnxruntime"]["accuracy_delta_equal_budget_ci"] = [lo, hi]
        with open(args.raw, "a") as fh:
            fh.write(json.dumps(point) + "\n")
        print(label, f"{point['bytes'] / 1e6:.1f} MB", f"ort accuracy {ev['accuracy']:.4f}",
              f"({d:+.4f} [{lo:+.4f}, {hi:+.4f}])", flush=True)  # fmt: skip


TIMER = """
import json, sys, torch
from curvature.integrations.latency import measure_model
from curvature.integrations.runtime import OnnxModel, load_saved
kind, path, reps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = load_saved(path) if kind == "pytorch" else OnnxModel(path, threads)
gen = torch.Generator().manual_seed(0)
out = {}
for size in (16, 1):
    ids = torch.randint(0, 30522, (size, 128), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.zeros_like(ids)}
    out[size] = measure_model(model, batch, reps=reps)
print(json.dumps(out))
"""


def measure(args) -> None:
    """Dense PyTorch float32 and every exported model, each timed in a fresh process of its own
    (two runtimes' idle threads in one process slow each other down), the models taken in turn
    round after round so that drift in the machine's speed hits all of them alike."""
    import torch

    threads = torch.get_num_threads()
    points = [json.loads(line) for line in open(args.raw)]
    models = {"dense, PyTorch float32": ("pytorch", args.dense)}
    for pt in points:
        models[pt["label"]] = ("onnx", pt["onnx"])
    times: dict = {(k, b): [] for k in models for b in (16, 1)}
    for _ in range(args.rounds):
        for key, (kind, path) in models.items():
            proc = subprocess.run(
                [sys.executable, "-c", TIMER, kind, path, str(args.reps), str(threads)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            for size, ms in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                times[(key, int(size))].append(ms)
    rows = []
    for (key, size), ts in times.items():
        ts = sorted(ts)
        rows.append({"model": key, "batch_size": size, "sequence_length": 128,
                     "threads": threads, "ms": ts[len(ts) // 2], "rounds": ts,
                     "process": "one fresh process per model and round"})  # fmt: skip
        print(key, size, f"{ts[len(ts) // 2]:.1f} ms", flush=True)
    with open(args.measure, "w") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense", required=True, help="the fine-tuned dense model folder")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--work", default="runs/bench-runtime")
    ap.add_argument("--raw", required=True, help="JSON lines to append to (finished labels skip)")
    ap.add_argument(
        "--measure", default=None,
        help="instead of building: time the dense model and every exported model of --raw, "
        "alone, and write the latencies here (scripts/tables.py reads RAW-STEM-latency.jsonl)",
    )  # fmt: skip
    ap.add_argument(
        "--reexport", action="store_true",
        help="export and score every saved folder of --raw again (the pruning is not redone)",
    )  # fmt: skip
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.measure:
        measure(args)
    else:
        build(args)


if __name__ == "__main__":
    main()
