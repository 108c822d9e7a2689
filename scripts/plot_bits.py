"""Accuracy against file bits per dense parameter: every kind of compressed MiniLM on one axis.

Read from committed raw files only: unstructured OBS and magnitude (the one-shot sweep's
``results.csv``, this toolkit's bitmask checkpoint size), structured pruning
(``docs/structured-minilm``: float32 files of the smaller model), and quantized or structured and
quantized models (``docs/compressed-minilm``: packed files). The x axis is the saved file's bits
over the dense model's parameter count (32 for the float32 dense file); error bars are the 95%
bootstrap intervals of accuracy.

    python scripts/plot_bits.py --out docs/bits-minilm.png
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _short(label: str) -> str:
    """A compact point label: "4x, 1 epoch distilled + GPTQ 8-bit" -> "4x+d G8"."""
    out = label.replace(" sizes", "").replace(", 1 epoch distilled", "+d")
    out = out.replace("5 heads, 480 neurons", "5h/480n").replace(" + ", " ")
    return out.replace("GPTQ ", "G").replace("RTN ", "R").replace("-bit", "")


def series() -> dict[str, list[tuple[float, float, float, float, str]]]:
    """``{kind: [(bits per dense parameter, accuracy, ci low, ci high, label)]}``."""
    rows = list(csv.DictReader(open(ROOT / "docs/sweep-minilm-report/results.csv")))
    dense = next(r for r in rows if r["method"] == "dense")
    params = float(dense["params_kept"])
    out: dict[str, list] = {"dense": [], "unstructured OBS": [], "unstructured magnitude": []}
    out["dense"].append(
        (32.0, float(dense["accuracy"]), float(dense["accuracy_ci_low"]),
         float(dense["accuracy_ci_high"]), "dense")
    )  # fmt: skip
    for r in rows:
        if r["method"] in ("obs", "magnitude"):
            out[f"unstructured {'OBS' if r['method'] == 'obs' else 'magnitude'}"].append(
                (8 * float(r["compressed_bytes"]) / params, float(r["accuracy"]),
                 float(r["accuracy_ci_low"]), float(r["accuracy_ci_high"]),
                 f"{float(r['target_sparsity']):.0%}")
            )  # fmt: skip
    sizes = {}
    for r in _jsonl(ROOT / "docs/structured-minilm/points-latency.jsonl"):
        sizes[Path(r["model"]).name] = r["bytes"]
    out["structured OBS"] = []
    for p in _jsonl(ROOT / "docs/structured-minilm/points.jsonl"):
        if p.get("method") != "obs" or p["metrics"].get("sparsity"):
            continue
        name = Path(p["argv"][p["argv"].index("--output") + 1]).name
        ev = p["metrics"]["pruned"]
        out["structured OBS"].append(
            (8 * sizes[name] / params, ev["accuracy"], ev["accuracy_ci_low"],
             ev["accuracy_ci_high"], p["label"])
        )  # fmt: skip
    out["quantized (GPTQ / RTN), structured + quantized"] = []
    for p in _jsonl(ROOT / "docs/compressed-minilm/points.jsonl"):
        ev = (p.get("metrics") or {}).get("pruned")
        if not ev:
            continue
        out["quantized (GPTQ / RTN), structured + quantized"].append(
            (8 * p["bytes"] / params, ev["accuracy"], ev["accuracy_ci_low"],
             ev["accuracy_ci_high"], _short(p["label"]))
        )  # fmt: skip
    return out


def smollm2_series() -> dict[str, list]:
    """SmolLM2 quantized points (``docs/quant-smollm2``): bits per weight of the linear layers
    against perplexity."""
    pts = _jsonl(ROOT / "docs/quant-smollm2/points.jsonl")
    d = pts[0]["dense"]
    out: dict[str, list] = {"dense": [(32.0, d["perplexity"], d["perplexity_ci_low"],
                                      d["perplexity_ci_high"], "dense")]}  # fmt: skip
    for p in pts:
        kind = "GPTQ, pruned in the same sweep" if "joint" in p["label"] else p["label"].split()[0]
        kind = {"gptq": "GPTQ", "rtn": "round-to-nearest"}.get(kind, kind)
        ev = p["pruned"]
        out.setdefault(kind, []).append(
            (p["quantized"]["bits_per_weight"],  # zeros are codes too in the packed formats
             ev["perplexity"], ev["perplexity_ci_low"], ev["perplexity_ci_high"],
             " ".join(p["label"].split()[1:]))
        )  # fmt: skip
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or str(ROOT / f"docs/bits-{args.model}.png")
    if args.model == "smollm2":
        return _plot_smollm2(args.out, plt)
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, pts in series().items():
        pts = sorted(pts)
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=kind,
                    linestyle="-" if len(pts) > 1 and "quantized" not in kind else "none")  # fmt: skip
        for i, p in enumerate(pts):
            offset = (3, 3 + 7 * (i % 3)) if "quantized" in kind else (3, 3)
            ax.annotate(p[4], (p[0], p[1]), fontsize=6, xytext=offset, textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("saved file bits per dense parameter (log scale; float32 dense = 32)")
    ax.set_ylabel("accuracy (bbc-news, 95% CI)")
    ax.set_title("MiniLM: accuracy at each size, every kind of compression")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)


def _plot_smollm2(out: str, plt) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, pts in smollm2_series().items():
        pts = sorted(pts)
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, marker="o", capsize=3,
                    linestyle="none", label=kind)  # fmt: skip
        for p in pts:
            ax.annotate(p[4], (p[0], p[1]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the linear layers (codes, scales, zero points; dense = 32)")
    ax.set_ylabel("perplexity (BBC News, 95% CI)")
    ax.set_title("SmolLM2-135M: perplexity at each bit width")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
