"""GPTQ against round-to-nearest on SmolLM2-135M (BBC News, the project's perplexity protocol).

Each point is one ``curvature prune --oneshot`` of ``recipes/quantized-smollm2.yaml`` in its own
process (``--float-weights``: SmolLM2's 576 columns leave a shorter last group of 128, which the
packed format cannot store), with the protocol of ``docs/results-smollm2.md``: calibration from the
first 200 training articles in 512-token blocks (``batches`` batches of 8), evaluation on the first
40 validation articles. Recorded per point: the dense and quantized perplexity with their 95%
intervals and the paired difference, the quantization seconds, the job's peak memory and wall
time, and the bits per weight of the quantized layers (codes, and a 16-bit scale and zero point
per group). Raw JSON lines go to ``--raw`` (finished labels are skipped on a rerun);
``scripts/tables.py quant-llm`` makes the table.

    python scripts/bench_quant_llm.py --raw docs/quant-smollm2/points.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from _bench import run_child  # noqa: E402

PROTOCOL = ["--model", "smollm2", "--data", "bbc-news", "--task", "causal-lm", "--max-train", "200",
            "--max-eval", "40", "--max-length", "512", "--batch-size", "8"]  # fmt: skip


def _points() -> list[tuple[str, dict]]:
    """In the order they run: grouped grids first, then act-order and joint pruning, then
    per-channel grids."""
    out = []

    def both(bits, group):
        g = "per-channel" if group == "null" else f"g{group}"
        for q in ("rtn", "gptq"):
            sets = {"quantizer": q, "bits": bits, "group": group}
            if q == "rtn":
                sets["batches"] = 128  # the default: round-to-nearest reads no data
            out.append((f"{q} {bits}-bit {g}", sets))

    both(8, "null")
    both(4, 128)
    both(3, 128)
    out.append(("gptq 4-bit g128 act-order", {"bits": 4, "group": 128, "actorder": "true"}))
    out.append(("gptq 4-bit g128 + 50% joint", {"bits": 4, "group": 128, "sparsity": 0.5}))
    out.append(("gptq 4-bit g128 + 2:4 joint", {"bits": 4, "group": 128, "mask": "'2:4'"}))
    both(3, "null")
    both(4, "null")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", required=True)
    ap.add_argument("--work", default="runs/bench-quant-llm")
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    args = ap.parse_args()
    Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if Path(args.raw).exists():
        done = {json.loads(line)["label"] for line in open(args.raw)}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for i, (label, sets) in enumerate(_points()):
        if label in done or (only and label not in only):
            continue
        out = Path(args.work) / f"point-{i}"
        argv = ["prune", str(ROOT / "recipes" / "quantized-smollm2.yaml"), *PROTOCOL, "--oneshot",
                "--float-weights", "--output", str(out), "--overwrite", "--no-progress"]  # fmt: skip
        for k, v in sets.items():
            argv += ["--set", f"{k}={v}"]
        rc, usage = run_child(argv)
        if rc:
            raise SystemExit(f"curvature {' '.join(argv)} failed ({rc})")
        wall = usage.pop("wall_s")
        m = json.loads((out / "metrics.json").read_text())
        point = {"label": label, "sets": sets, "argv": argv, "wall_s": wall, **usage,
                 "dense": m["dense"], "pruned": m["pruned"], "quantized": m["quantized"]}  # fmt: skip
        with open(args.raw, "a") as fh:
            fh.write(json.dumps(point) + "\n")
        print(label, f"perplexity {m['pruned']['perplexity']:.2f}", f"(dense {m['dense']['perplexity']:.2f})",
              f"{m['quantized']['seconds']:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
