"""The results of runs as tables, aggregates and plots: read by the sweep while it runs and by
``curvature report`` afterwards (neither imports the other).

A sweep's points (``points.jsonl``) are grouped by method, mask, mode and target; each group's
metrics are averaged over seeds with 95% intervals and paired differences against dense (and
against a baseline method), then written as a Markdown table and plotted.
"""

from __future__ import annotations

import json
from pathlib import Path


def point_key(p: dict) -> tuple:
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


def groups(points: list[dict]) -> dict[tuple, list[dict]]:
    """The points by method, mask, mode and target; each group's seeds in order."""
    out: dict[tuple, list[dict]] = {}
    for p in points:
        out.setdefault(point_key(p)[:4], []).append(p)
    for pts in out.values():
        pts.sort(key=lambda p: p.get("seed_index", 0))
    return out


def load_units(folder: Path, p: dict):
    """The saved units of a point, or None (points written before predictions were kept)."""
    from curvature.tasks.stats import read_units

    path = Path(folder) / "predictions" / f"{point_name(p)}.csv"
    return read_units(path) if path.is_file() else None


METRICS = ("accuracy", "f1", "exact_match", "perplexity", "loss")  # table columns, in order


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

    by_key = groups(points)
    dense_pts = by_key.get(("dense", "-", "-", 0.0))
    dense_units = load_units(folder, dense_pts[0]) if dense_pts else None
    rows = []
    for pts in by_key.values():
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
        _against_baseline(folder, by_key, rows, baseline, dense_units)
    return sorted(
        rows, key=lambda r: (r["method"] != "dense", r["mode"], r["method"], r["target_sparsity"])
    )


def _reads_data(method: str) -> bool:
    from curvature.pruning import METHODS

    return method not in METHODS or METHODS[method].needs_data


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

    #: what ``m_delta`` compares the pruned model with, and the other comparison's key
    ref = metrics.get("compared_with", "dense")
    short = {"dense_equal_budget": "vs dense same steps", "dense": "vs dense before pruning"}
    other = "dense" if ref == "dense_equal_budget" else "dense_equal_budget"

    def row(label, ev):
        def one(c):
            text = _fmt(ev[c])
            if f"{c}_ci_low" in ev:
                text += f" [{_fmt(ev[c + '_ci_low'])}, {_fmt(ev[c + '_ci_high'])}]"
            for key, name in ((f"{c}_delta", ref), (f"{c}_delta_{other}", other)):
                if key in ev:
                    text += (
                        f"; {short[name]} {ev[key]:+.4f} [{ev[key + '_ci_low']:+.4f}, "
                        f"{ev[key + '_ci_high']:+.4f}]"
                    )
            return text

        return f"| {label} | " + " | ".join(one(c) for c in cols) + " |"

    if dense:
        lines.append(row("dense (before pruning)", dense))
    base = metrics.get("dense_equal_budget")
    if base:
        lines.append(row(f"dense, the same {base['steps']} steps without pruning", base))
    if metrics.get("before_training"):
        lines.append(row("structures removed, before training", metrics["before_training"]))
    steps = f", {metrics['steps']} steps" if metrics.get("steps") else ""
    lines.append(row(f"pruned{steps}", pruned))
    if any(k.endswith("_ci_low") for k in pruned):
        lines += [
            "",
            "In brackets: 95% bootstrap intervals over the validation examples; `vs dense ...` is "
            "the paired difference on the same examples against the dense model it names (a real "
            "change only when its interval excludes zero). The pruned model is compared first "
            + (
                "with the dense model trained for the same steps without pruning (the equal "
                "budget), then with the dense model before pruning."
                if ref == "dense_equal_budget"
                else "with the dense model before pruning (no equal-budget dense model was "
                "trained: `--dense-baseline` trains one)."
            ),
        ]
    if "pies" in metrics:
        ece = pruned.get("ece")
        lines.append(
            f"Pruning changed the prediction of {metrics['pies']} validation examples against the "
            f"{'dense model of the same steps' if ref == 'dense_equal_budget' else 'dense model'} "
            f"(PIEs; `predictions/` holds the models' predictions)"
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
