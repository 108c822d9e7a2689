"""The measured tables of README.md and docs/, regenerated from the raw files beside them.

Every table in the documentation has a marker comment on the line before it:

- ``<!-- table: KIND SOURCE -->``: generated here by ``KIND`` from ``SOURCE`` (a raw file,
  relative to the Markdown file's folder; ``KIND SOURCE SELECTOR`` where the file holds several
  tables); ``tests/project/test_tables.py`` regenerates it and
  fails when the page differs;
- ``<!-- table: measured at commit SHA; raw output not kept -->``: a run whose raw output is not
  in the repository; the commit is the one that added the numbers;
- ``<!-- table: reference -->``: not a measurement (names, settings, layout).

    python scripts/tables.py --check     # every generated table equals its regeneration
    python scripts/tables.py --write     # rewrite the generated tables from their sources
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- table: (.*?) -->$")


def _number(text: str):
    if text == "":
        return None
    try:
        return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
    except ValueError:
        return text


def read_rows(path: Path) -> list[dict]:
    """A sweep's aggregated rows from its ``results.csv`` (numbers parsed, empty cells absent)
    or ``results.json``."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with open(path, newline="") as fh:
        return [{k: _number(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]


def sweep(path: Path) -> str:
    """The sweep's own results table (``results.md``), from its rows."""
    sys.path.insert(0, str(ROOT))
    from curvature.cli.results import markdown_table

    return markdown_table(read_rows(path)).rstrip("\n")


def _signed(x: float) -> str:
    return f"{x:+.4f}".replace("-", "\u2212")


def _sig(x: float) -> str:
    """Four significant digits, thousands separated (perplexities from 28.28 to 90,384)."""
    if abs(x) < 1:
        return f"{x:.4f}"
    digits = len(str(int(abs(x))))
    if len(str(int(abs(round(x, max(0, 4 - digits)))))) > digits:  # 999.96 rounds to 1,000
        digits += 1
    return f"{x:,.{max(0, 4 - digits)}f}"


def _dense_metric(rows: list[dict]):
    """A sweep's dense row, its headline metric (accuracy, else perplexity) and how to print it."""
    dense = next(r for r in rows if r["method"] == "dense")
    metric = "accuracy" if "accuracy" in dense else "perplexity"
    return dense, metric, (lambda x: f"{x:.4f}") if metric == "accuracy" else _sig


def sweep_grid(path: Path) -> str:
    """A sweep's points as one row per method and one column per mode, mask and target
    (accuracy, or perplexity for a language model), with each method's pruning seconds (of a
    gradual point: the whole run, its training included)."""
    rows = read_rows(path)
    dense, metric, show = _dense_metric(rows)

    def key(r):
        return r["mode"], r["mask"], r["target_sparsity"]

    def label(c):
        mode, mask, target = c
        where = (
            mask
            if ":" in mask
            else (f"{mask} " if mask != "unstructured" else "") + (f"{target:.0%}")
        )
        return where if mode == "oneshot" else f"{mode} {where}"

    points = [r for r in rows if r["method"] != "dense"]
    cols = sorted({key(r) for r in points},
                  key=lambda c: (c[0], ":" in c[1], c[1] != "unstructured", c[1], c[2]))  # fmt: skip
    gradual = any(r["mode"] != "oneshot" for r in points)
    secs_label = "prune seconds a point" + (
        " (gradual: the whole run, training included)" if gradual else ""
    )
    out = [
        f"| method (dense {show(dense[metric])}) | "
        + " | ".join(label(c) for c in cols)
        + f" | {secs_label} |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for method in dict.fromkeys(r["method"] for r in points):
        mine = {key(r): r for r in points if r["method"] == method}
        cells = [show(mine[c][metric]) if c in mine else "not run" for c in cols]
        secs = sorted({f"{r['prune_seconds']:.0f}" for r in mine.values()}, key=float)
        span = secs[0] if len(secs) == 1 else f"{secs[0]}-{secs[-1]}"
        out.append(f"| {method} | " + " | ".join(cells) + f" | {span} |")
    return "\n".join(out)


def sweep_baseline(path: Path) -> str:
    """A sweep reported against a baseline method (``--baseline``): every point's metric with its
    interval, the share of the baseline's damage it avoids (paired, over the same evaluation
    units), pruning seconds and peak memory."""
    rows = read_rows(path)
    dense, metric, show = _dense_metric(rows)
    base = next((r["baseline"] for r in rows if r.get("baseline")), None)
    if base is None:
        raise SystemExit(f"{path}: a sweep without --baseline (no share of damage to show)")
    out = [
        f"| method (dense {show(dense[metric])} [{show(dense[metric + '_ci_low'])}, "
        f"{show(dense[metric + '_ci_high'])}]) | mask, target | seeds | {metric} [95% CI] | "
        f"share of {base}'s damage avoided [95% CI] | prune s | peak GB |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for r in rows:
        if r["method"] == "dense":
            continue
        gap = "baseline" if r["method"] == base else "-"
        if f"{metric}_gap_closed" in r:
            g, lo, hi = (r[f"{metric}_gap_closed{k}"] for k in ("", "_ci_low", "_ci_high"))
            gap = f"{g:.0%} [{lo:.0%}, {hi:.0%}]"
        where = r["mask"] if ":" in r["mask"] else f"{r['mask']} {r['target_sparsity']:.0%}"
        out.append(
            f"| {r['method']} | {where} | {r['seeds']} | {show(r[metric])} "
            f"[{show(r[metric + '_ci_low'])}, {show(r[metric + '_ci_high'])}] | {gap} | "
            f"{r['prune_seconds']:.0f} | "
            + (f"{r['peak_memory_mb'] / 1024:.1f} |" if "peak_memory_mb" in r else "- |")
        )
    return "\n".join(out)


def sweep_summary(path: Path) -> str:
    """One-shot points of a sweep: accuracy with its interval (and the spread over seeds), the
    paired difference against dense with its verdict, PIEs and ECE."""
    rows = read_rows(path)
    dense = next(r for r in rows if r["method"] == "dense")
    order = {"magnitude": 0, "obs": 1}
    label = {"obs": "OBS"}
    points = sorted(
        (r for r in rows if r["method"] != "dense"),
        key=lambda r: (r["target_sparsity"], order.get(r["method"], 9), r["method"]),
    )
    out = [
        f"| one-shot | accuracy [95% CI] (± std over {max(r['seeds'] for r in points)} seeds) "
        "| pruned − dense, paired [95% CI] | PIEs | ECE |",
        "|---|---|---|---|---|",
        f"| dense | {dense['accuracy']:.4f} [{dense['accuracy_ci_low']:.4f}, "
        f"{dense['accuracy_ci_high']:.4f}] | | | {dense['ece']:.3f} |",
    ]
    for r in points:
        acc = f"{r['accuracy']:.4f} [{r['accuracy_ci_low']:.4f}, {r['accuracy_ci_high']:.4f}]"
        if r.get("accuracy_std"):
            acc += f" ± {r['accuracy_std']:.4f}"
        lo, hi = r["accuracy_delta_ci_low"], r["accuracy_delta_ci_high"]
        verdict = "within noise" if lo <= 0 <= hi else ("worse" if hi < 0 else "better")
        delta = f"{_signed(r['accuracy_delta'])} [{_signed(lo)}, {_signed(hi)}] {verdict}"
        name = f"{label.get(r['method'], r['method'])} {round(r['target_sparsity'] * 100)}%"
        out.append(f"| {name} | {acc} | {delta} | {r['pies']} | {r['ece']:.3f} |")
    return "\n".join(out)


def main_job(path: Path) -> str:
    """The main job's three models from its ``metrics.json``."""
    m = json.loads(path.read_text())
    rows = [("dense after 1 epoch (before pruning)", None, m["dense"])]
    base = m.get("dense_equal_budget")
    if base:
        rows.append(
            (f"dense, the same {base['steps']} steps without pruning (`--dense-baseline`)",
             base["steps"], base)
        )  # fmt: skip
    rows.append(
        (f"pruned, {m['sparsity']:.0%} of the encoder's linear weights", m["steps"], m["pruned"])
    )
    out = [
        "| model | steps | validation accuracy [95% CI] | validation loss |",
        "|---|---:|---:|---:|",
    ]
    first = m["pruning_steps"][0]["epoch"] if m.get("pruning_steps") else None
    for name, steps, ev in rows:
        if steps is None:  # the dense model is evaluated right before the first pruning step
            steps = round(m["steps"] * first / m["epochs"]) if first is not None else 0
        acc = f"{ev['accuracy']:.4f} [{ev['accuracy_ci_low']:.4f}, {ev['accuracy_ci_high']:.4f}]"
        out.append(f"| {name} | {steps} | {acc} | {ev['loss']:.4f} |")
    return "\n".join(out)


def storage(path: Path) -> str:
    """Before and after of ``bench_curvature.py --storage`` (SOURCE: the 'after' file; the
    'before' file is beside it with ``-before``)."""

    def parse(p: Path) -> dict:
        out = {}
        for line in p.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] in ("floor", "float32", "float64"):
                out[parts[0]] = (float(parts[1]), float(parts[2]))
        return out

    now = parse(path)
    before = parse(path.with_name(path.stem + "-before" + path.suffix))
    out = ["| storage | before: ms (x floor) | now: ms (x floor) |", "|---|---:|---:|"]
    for name in ("float32", "float64"):
        (b, bx), (n, nx) = before[name], now[name]
        out.append(f"| {name} | {b:.1f} ({bx:.1f}x) | {n:.1f} ({nx:.1f}x) |")
    return "\n".join(out)


def _script(name: str):
    """A module of ``scripts/`` (the benchmarks own their tables' layout)."""
    import importlib

    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module(name)


def _bench_optim():
    return _script("bench_optim")


def _from_script(module: str, table: str, key: str | None = None):
    """A kind that gives ``module.table`` the raw JSON (or its ``key``) of a ``--json`` run, and
    the marker's selector when it has one (which of the file's tables)."""

    def make(path: Path, *selector: str) -> str:
        raw = json.loads(path.read_text())
        return "\n".join(getattr(_script(module), table)(raw[key] if key else raw, *selector))

    make.__doc__ = f"``{module}.py``'s ``{table}`` from its ``--json`` file."
    return make


def optim_compare(path: Path) -> str:
    """``bench_optim.py --part compare``'s table from its JSON (every probe and seed)."""
    bench_optim = _bench_optim()
    out = json.loads(path.read_text())
    names = list(dict.fromkeys(k.split("|")[0] for k in out["runs"]))
    seeds = sorted({int(k.split("|")[1]) for k in out["runs"]})
    return "\n".join(bench_optim.compare_tables(out, names, seeds))


def optim_target(path: Path) -> str:
    """``bench_optim.py --part target``'s tuning and time-to-target tables from its JSON."""
    return "\n".join(_bench_optim().target_tables(json.loads(path.read_text())))


def optim_target_tuning(path: Path) -> str:
    """``bench_optim.py --part target``'s tuning probes and choices from its JSON."""
    return "\n".join(_bench_optim().target_tuning_table(json.loads(path.read_text())))


def optim_cost(path: Path) -> str:
    """``bench_optim.py --part cost --json``'s cost table from its raw rows."""
    return "\n".join(_bench_optim().cost_table(json.loads(path.read_text())["cost"]["rows"]))


def optim_quality(path: Path) -> str:
    """``bench_optim.py --part quality --json``'s fine-tuning table from its raw runs."""
    q = json.loads(path.read_text())["quality"]
    return "\n".join(_bench_optim().quality_table(q["runs"], q["steps"], q["target"]))


def _ci(ev: dict, key: str, signed=False) -> str:
    fmt = _signed if signed else (lambda x: f"{x:.4f}")
    return f"{fmt(ev[key])} [{fmt(ev[key + '_ci_low'])}, {fmt(ev[key + '_ci_high'])}]"


#: the order of the methods within a point of the structured tables
STRUCTURED_METHODS = ("obs", "fisher", "taylor", "magnitude", "activation", "fluctuation")


def _structured_points(path: Path) -> tuple[list, dict]:
    """The raw points of ``bench_structured.py`` in table order (points as they first appear,
    methods in :data:`STRUCTURED_METHODS` order), and the latencies measured afterwards, all
    models alone in one process (``STEM-latency.jsonl``), by (folder name, batch size)."""
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    labels = list(dict.fromkeys(p["label"] for p in points))
    order = {m: i for i, m in enumerate(STRUCTURED_METHODS)}
    points.sort(key=lambda p: (labels.index(p["label"]), order.get(p["method"], len(order))))
    lat = {}
    for line in path.with_name(path.stem + "-latency.jsonl").read_text().splitlines():
        r = json.loads(line)
        lat[(Path(r["model"]).name, r["batch_size"])] = r
    return points, lat


def _folder(point: dict) -> str:
    return Path(point["argv"][point["argv"].index("--output") + 1]).name


def structured_gradual(path: Path) -> str:
    """Gradual structured pruning with distillation (``bench_structured.py --gradual``): SOURCE
    is its raw JSON lines, the latencies ``STEM-latency.jsonl`` beside it."""
    points, lat = _structured_points(path)
    d16, d1 = lat[("dense", 16)]["ms"], lat[("dense", 1)]["ms"]
    out = [
        "| point | method | heads / neurons per block | epochs | accuracy [95% CI] | "
        "− dense, same steps [paired 95% CI] | − dense before [paired 95% CI] | "
        "dense, same steps | measured 16×128 | measured 1×128 | structured s | job s | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        m, name = p["metrics"], _folder(p)
        s, ev = m["structured"], m["pruned"]
        assert m["compared_with"] == "dense_equal_budget", p["label"]
        out.append(
            f"| {p['label']} | {p['method']} | {s['sizes']['heads'][0]} / "
            f"{s['sizes']['neurons'][0]} | {p['epochs']:g} | {_ci(ev, 'accuracy')} | "
            f"{_ci(ev, 'accuracy_delta', signed=True)} | "
            f"{_ci(ev, 'accuracy_delta_dense', signed=True)} | "
            f"{m['dense_equal_budget']['accuracy']:.4f} | {d16 / lat[(name, 16)]['ms']:.2f}x | "
            f"{d1 / lat[(name, 1)]['ms']:.2f}x | {s['seconds']:.0f} | {p['wall_s']:.0f} | "
            f"{p['max_rss_mib'] / 1024:.1f} |"
        )
    return "\n".join(out)


def _ci2(ev: dict, key: str, sign: str = "") -> str:
    """``value [low, high]`` with two decimals (perplexities)."""
    low, high = ev[key + "_ci_low"], ev[key + "_ci_high"]
    return f"{ev[key]:{sign}.2f} [{low:{sign}.2f}, {high:{sign}.2f}]"


def structured_llm(path: Path) -> str:
    """Structured pruning of the decoder (``bench_structured.py --setup smollm2``): SOURCE is its
    raw JSON lines, the prefill latencies ``STEM-latency.jsonl`` beside it."""
    points, lat = _structured_points(path)
    dense = lat[("dense", 1)]
    ev0 = points[0]["metrics"]["dense"]
    out = [
        "| point | method | key/value heads / neurons per block | MB | perplexity [95% CI] | "
        "− dense [paired 95% CI] | speed-up predicted | measured prefill 1×512 | structured s | "
        "job s | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense | | 3 / 1536 | {dense['bytes'] / 1e6:.0f} | "
        f"{_ci2(ev0, 'perplexity')} | | | {dense['ms']:.0f} ms | | | |",
    ]
    for p in points:
        s, ev = p["metrics"]["structured"], p["metrics"]["pruned"]
        predicted = f"{s['predicted_speedup']:.2f}x" if "predicted_speedup" in s else ""
        out.append(
            f"{_llm_point(p, lat)} {_ci2(ev, 'perplexity')} | "
            f"{_ci2(ev, 'perplexity_delta', '+')} | {predicted} | {_llm_costs(p, lat, dense)}"
        )
    return "\n".join(out)


def _llm_point(p: dict, lat: dict) -> str:
    """A decoder point's first cells: label, method, sizes left in each block (3 key/value heads
    when none was removed) and megabytes."""
    sizes = p["metrics"]["structured"]["sizes"]
    mb = lat[(_folder(p), 1)]["bytes"] / 1e6
    return (
        f"| {p['label']} | {p['method']} | {sizes.get('heads', [3])[0]} / {sizes['neurons'][0]} | "
        f"{mb:.0f} |"
    )


def _llm_costs(p: dict, lat: dict, dense: dict) -> str:
    """A decoder point's last cells: measured prefill speed-up, structured seconds, job seconds
    and peak memory."""
    ms = lat[(_folder(p), 1)]["ms"]
    return (
        f"{dense['ms'] / ms:.2f}x | {_structured_seconds(p['metrics']['structured']):.0f} | "
        f"{p['wall_s']:.0f} | {p['max_rss_mib'] / 1024:.1f} |"
    )


def check_kernels(path: Path) -> str:
    """``scripts/check_kernels.py --json``'s register, spill and occupancy table from its rows."""
    return _script("check_kernels").table(json.loads(path.read_text())["rows"])


def check_kernels_summary(path: Path) -> str:
    """One row per kernel of ``scripts/check_kernels.py --json``: targets, configurations per
    target, the register range on the newest target, spills and the lowest estimated occupancy."""
    rows = json.loads(path.read_text())["rows"]
    out = [
        "| kernel | targets | configurations per target | registers per thread (newest target) "
        "| spill bytes | compile errors | lowest estimated occupancy |",
        "|---|---|---|---|---|---|---|",
    ]
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel]
        archs = sorted({r["arch"] for r in mine})
        ok = [r for r in mine if not r["error"]]
        newest = [r["regs"] for r in ok if r["arch"] == archs[-1]]
        regs = f"{min(newest)}-{max(newest)}" if newest else "-"
        low = f"{min(r['occupancy'] for r in ok):.0%}" if ok else "-"
        out.append(
            f"| {kernel} | {', '.join(f'sm_{a}' for a in archs)} | {len(mine) // len(archs)} "
            f"| {regs} | {sum(r['spill'] for r in ok)} | {len(mine) - len(ok)} | {low} |"
        )
    return "\n".join(out)


def structured_llm_recover(path: Path) -> str:
    """The decoder removed at once and then fine-tuned with distillation (``bench_structured.py
    --setup smollm2 --sizes ... --recover``): each job's model right after the removal ("one-shot")
    and after its training steps, both paired with the dense model; SOURCE is the raw JSON lines,
    the prefill latencies ``STEM-latency.jsonl`` beside it."""
    points, lat = _structured_points(path)
    dense = lat[("dense", 1)]
    ev0 = points[0]["metrics"]["dense"]
    out = [
        "| point | method | key/value heads / neurons per block | MB | one-shot perplexity "
        "[95% CI] | − dense [paired 95% CI] | steps | recovered perplexity [95% CI] | − dense "
        "[paired 95% CI] | measured prefill 1×512 | structured s | job s | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense | | 3 / 1536 | {dense['bytes'] / 1e6:.0f} | {_ci2(ev0, 'perplexity')} | | | | "
        f"| {dense['ms']:.0f} ms | | | |",
    ]
    for p in points:
        m = p["metrics"]
        before, ev = m["before_training"], m["pruned"]
        assert m["compared_with"] == "dense" and m["dense"] == ev0, p["label"]
        out.append(
            f"{_llm_point(p, lat)} {_ci2(before, 'perplexity')} | "
            f"{_ci2(before, 'perplexity_delta', '+')} | {m['steps']} | {_ci2(ev, 'perplexity')} | "
            f"{_ci2(ev, 'perplexity_delta', '+')} | {_llm_costs(p, lat, dense)}"
        )
    return "\n".join(out)


def _structured_seconds(s: dict) -> float:
    """The structured step's seconds: removal, error curves and latency table (when planned)."""
    return (
        s.get("seconds", 0.0)
        + s.get("seconds_error_curves", 0.0)
        + s.get("latency_table", {}).get("seconds", 0.0)
    )


def _span(values: list) -> str:
    """One size, or ``min–max`` where the blocks keep different sizes."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def structured(path: Path) -> str:
    """Structured pruning points (``bench_structured.py``): SOURCE is its raw JSON lines; the
    latencies measured afterwards, all models alone in one process, are ``STEM-latency.jsonl`` beside
    it."""
    points, lat = _structured_points(path)
    dense_mb = lat[("dense", 16)]["bytes"] / 1e6
    out = [
        "| point | method | heads / neurons per block | MB | accuracy [95% CI] | "
        "− dense [paired 95% CI] | speed-up predicted | measured 16×128 | measured 1×128 | "
        "structured s | job s | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    d16, d1 = lat[("dense", 16)]["ms"], lat[("dense", 1)]["ms"]
    out.append(
        f"| dense | | 12 / 1536 | {dense_mb:.1f} | "
        f"{points[0]['metrics']['dense']['accuracy']:.4f} | | | {d16:.0f} ms | {d1:.1f} ms | | | |"
    )
    for p in points:
        m = p["metrics"]
        s = m.get("structured", {})
        name = Path(p["argv"][p["argv"].index("--output") + 1]).name
        sizes = s.get("sizes", {})
        shape = " / ".join(_span(sizes[k]) for k in ("heads", "neurons")) if sizes else "12 / 1536"
        if m.get("sparsity"):
            shape += f", {m['sparsity']:.0%} zeros"
        predicted = f"{s['predicted_speedup']:.2f}x" if "predicted_speedup" in s else ""
        ev = m["pruned"]
        acc = _ci(ev, "accuracy")
        delta = _ci(ev, "accuracy_delta", signed=True)
        m16 = d16 / lat[(name, 16)]["ms"]
        m1 = d1 / lat[(name, 1)]["ms"]
        mb = lat[(name, 16)]["bytes"] / 1e6
        secs = _structured_seconds(s)
        out.append(
            f"| {p['label']} | {p['method']} | {shape} | {mb:.1f} | {acc} | {delta} | {predicted} | "
            f"{m16:.2f}x | {m1:.2f}x | {secs:.0f} | {p['wall_s']:.0f} | {p['max_rss_mib'] / 1024:.1f} |"
        )
    return "\n".join(out)


def runtime(path: Path) -> str:
    """Compressed models in ONNX Runtime (``bench_runtime.py``): SOURCE is its raw JSON lines, the
    latencies (every model alone in one process) ``STEM-latency.jsonl`` beside it."""
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lat = {}
    for line in path.with_name(path.stem + "-latency.jsonl").read_text().splitlines():
        r = json.loads(line)
        lat[(r["model"], r["batch_size"])] = r
    base = "dense, PyTorch float32"
    d16, d1 = lat[(base, 16)]["ms"], lat[(base, 1)]["ms"]
    dense_mb = points[0]["bytes"] / 1e6
    out = [
        "| model | heads / neurons per block | saved MB | smaller | bits / dense parameter | "
        "ONNX MB | PyTorch accuracy: − dense [paired 95% CI] | ONNX Runtime accuracy: − dense "
        "[paired 95% CI] | ms 16×128 | faster | ms 1×128 | faster |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense, PyTorch float32 | 12 / 1536 | {dense_mb:.1f} | 1.0x | 32.0 | | | | {d16:.0f} | "
        f"1.00x | {d1:.1f} | 1.00x |",
    ]
    for p in points:
        m = p.get("metrics") or {}
        sizes = (m.get("structured") or {}).get("sizes")
        shape = f"{sizes['heads'][0]} / {sizes['neurons'][0]}" if sizes else "12 / 1536"
        bpp = f"{32 * p['bytes'] / points[0]['bytes']:.1f}"  # file bits per dense parameter
        torch_acc = _ci(m["pruned"], "accuracy_delta", signed=True) if m.get("pruned") else ""
        o = p["onnxruntime"]
        lo, hi = o["accuracy_delta_ci"]
        ort = f"{o['accuracy']:.4f}: {_signed(o['accuracy_delta'])} [{_signed(lo)}, {_signed(hi)}]"
        if "accuracy_delta_equal_budget" in o:  # fine-tuned: against the dense model of its steps
            lo, hi = o["accuracy_delta_equal_budget_ci"]
            d = _signed(o["accuracy_delta_equal_budget"])
            ort += f"; {d} [{_signed(lo)}, {_signed(hi)}] against the dense model of its steps"
        if m.get("pruned"):
            torch_acc = f"{m['pruned']['accuracy']:.4f}: {torch_acc}"
            if m.get("compared_with") == "dense_equal_budget":
                torch_acc += " against the dense model of its steps"
        m16, m1 = lat[(p["label"], 16)]["ms"], lat[(p["label"], 1)]["ms"]
        out.append(
            f"| {p['label']} | {shape} | {p['bytes'] / 1e6:.1f} | {dense_mb * 1e6 / p['bytes']:.1f}x "
            f"| {bpp} | {p['onnx_bytes'] / 1e6:.1f} | {torch_acc} | {ort} | {m16:.0f} | "
            f"{d16 / m16:.2f}x | {m1:.1f} | "
            f"{d1 / m1:.2f}x |"
        )
    return "\n".join(out)


def quant_llm(path: Path) -> str:
    """GPTQ against round-to-nearest on a decoder (``bench_quant_llm.py``): SOURCE is its raw JSON
    lines."""
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    d = points[0]["dense"]
    out = [
        "| setting | bits / weight | perplexity [95% CI] | − dense [paired 95% CI] | "
        "quantization s | job s | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| dense (float32) | 32 | {_ci(d, 'perplexity')} | | | | |",
    ]
    for p in points:
        q, ev = p["quantized"], p["pruned"]
        out.append(
            f"| {p['label']} | {q['bits_per_weight']:.2f} | {_ci(ev, 'perplexity')} | "
            f"{_ci(ev, 'perplexity_delta', signed=True)} | {q['seconds']:.0f} | {p['wall_s']:.0f} | "
            f"{p['max_rss_mib'] / 1024:.1f} |"
        )
    return "\n".join(out)


def quant_fidelity(path: Path) -> str:
    """GPTQ against the reference implementation layer by layer (``bench_quant.py``): SOURCE is its
    raw JSON lines."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = [
        "| layer | bits | group | act-order | error: reference | ours float64 | ours float32 | "
        "round-to-nearest | s: reference | ours float64 | ours float32 |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r["group"] or "channel"
        out.append(
            f"| {r['layer']} {r['shape'][0]}×{r['shape'][1]} | {r['bits']} | {g} | "
            f"{'yes' if r['act_order'] else 'no'} | {r['error_reference']:.5f} | "
            f"{r['error_ours']:.5f} | {r['error_ours_float32']:.5f} | {r['error_rtn']:.5f} | "
            f"{r['seconds_reference']:.3f} | {r['seconds_ours']:.3f} | "
            f"{r['seconds_ours_float32']:.3f} |"
        )
    return "\n".join(out)


def layerwise_reference(path: Path) -> str:
    """The layer-wise methods against their authors' scripts (``bench_pruning.py --part
    reference``): SOURCE is its raw JSON lines. Forward passes are the time outside the timed
    ``X^T X`` accumulation and solves; the paired interval is over validation documents."""
    import numpy as np

    from curvature.tasks import stats

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        r["units"] = {k: np.asarray(v) if k != "id" else v for k, v in r["units"].items()}
    published = {r["label"]: r for r in rows if r["implementation"] == "published"}
    out = [
        "| method | implementation | seconds | × published | forward passes | X^T X | solve | "
        "zeros | perplexity | − published [paired 95% CI] | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["timers"]
        prod = t.get("products", 0.0)
        solve = t.get("solve", r.get("phases", {}).get("solve", 0.0))
        ref = published.get(r["label"])
        dense = r["implementation"] == "dense"
        ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref else ""
        diff = ""
        if ref and ref is not r:
            d, lo, hi = stats.paired_interval(r["units"], ref["units"], "perplexity")
            diff = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        timing = (
            " | | |" if dense else f"{r['seconds'] - prod - solve:.1f} | {prod:.1f} | {solve:.1f} |"
        )
        secs = "" if dense else f"{r['seconds']:.1f}"
        out.append(
            f"| {r['label']} | {r['implementation']} | {secs} | {ratio} | {timing} "
            f"{r['sparsity']:.3f} | {r['perplexity']:.2f} | {diff} | "
            f"{r['max_rss_mib'] / 1024:.1f} |"
        )
    return "\n".join(out)


KINDS = {
    "layerwise-reference": layerwise_reference,
    "sweep": sweep,
    "sweep-summary": sweep_summary,
    "sweep-grid": sweep_grid,
    "sweep-baseline": sweep_baseline,
    "main-job": main_job,
    "storage": storage,
    "optim-compare": optim_compare,
    "optim-cost": optim_cost,
    "optim-quality": optim_quality,
    "optim-target": optim_target,
    "optim-target-tuning": optim_target_tuning,
    "optim-tiny-bert": _from_script("bench_optim", "tiny_bert_table"),
    "optim-mfac-product": _from_script("bench_optim", "mfac_product_table"),
    "optim-mfac-warmup": _from_script("bench_optim", "mfac_warmup_table"),
    "structured": structured,
    "structured-gradual": structured_gradual,
    "structured-llm": structured_llm,
    "structured-llm-recover": structured_llm_recover,
    "check-kernels": check_kernels,
    "check-kernels-summary": check_kernels_summary,
    "bench-kernels": _from_script("bench_kernels", "table"),
    "inference-layer": _from_script("bench_inference", "layer_table", "layer"),
    "inference-model": _from_script("bench_inference", "model_table", "model"),
    "distributed": _from_script("bench_distributed", "table"),
    "sparse-transfer": _from_script("demo_sparse_transfer", "table"),
    "pruning-stages": _from_script("bench_pruning", "stage_table"),
    "pruning-allocation": _from_script("bench_pruning", "allocation_table"),
    "pruning-dtype": _from_script("bench_pruning", "dtype_table"),
    "pruning-hessian": _from_script("bench_pruning", "hessian_table"),
    "pruning-layerwise": _from_script("bench_pruning", "layerwise_table"),
    "pruning-reconstruct": _from_script("bench_pruning", "reconstruct_table"),
    "runtime": runtime,
    "quant-llm": quant_llm,
    "quant-fidelity": quant_fidelity,
}


def sweep_folders() -> list[Path]:
    """Sweep folders kept in docs/ (the tool's own output: results.csv, results.md, report.md)."""
    return sorted(p.parent for p in (ROOT / "docs").rglob("results.csv"))


def pages() -> list[Path]:
    """README.md and the pages of docs/, without the sweep folders' own reports."""
    kept = sweep_folders()
    return [ROOT / "README.md"] + sorted(
        p for p in (ROOT / "docs").rglob("*.md") if p.parent not in kept
    )


def tables(page: Path) -> list[tuple[int, int, str | None]]:
    """``(first line, end line, marker text or None)`` of every table of ``page``."""
    lines = page.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|\s*:?-{3,}", lines[i + 1]):
            end = i + 2
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            m = MARKER.match(lines[j]) if j >= 0 else None
            found.append((i, end, m.group(1) if m else None))
            i = end
        else:
            i += 1
    return found


def generated(page: Path, marker: str) -> str | None:
    """The regenerated table of a ``KIND SOURCE [SELECTOR]`` marker (the selector: which of the
    source's tables, for the kinds that make several), or None for the other markers."""
    kind, *rest = marker.split() or [""]
    if kind not in KINDS:
        return None
    source, *selector = rest
    return KINDS[kind]((page.parent / source).resolve(), *selector)


def run(write: bool, only: list[Path] | None = None) -> list[str]:
    """Problems (or, with ``write``, rewrite): tables without a marker, generated tables that
    differ from their regeneration; ``only``: these pages instead of all of them."""
    problems = []
    for folder in (
        [] if only is not None else sweep_folders()
    ):  # the sweep's own table is its rows, as the sweep wrote it
        if (folder / "results.md").read_text().rstrip("\n") != sweep(folder / "results.csv"):
            problems.append(
                f"{(folder / 'results.md').relative_to(ROOT)}: differs from results.csv"
            )
    for page in pages() if only is None else only:
        lines = page.read_text().splitlines()
        changed = False
        for start, end, marker in reversed(tables(page)):
            rel = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
            if marker is None:
                problems.append(f"{rel}:{start + 1}: a table without a marker")
                continue
            words = marker.split() + ["", ""]
            source = page.parent / words[1]
            if words[0] in KINDS and not source.is_file():
                problems.append(f"{rel}:{start + 1}: `{marker}`: no such file {source.name}")
                continue
            table = generated(page, marker)
            if table is None:
                continue
            if "\n".join(lines[start:end]) != table:
                if write:
                    lines[start:end] = table.split("\n")
                    changed = True
                else:
                    problems.append(f"{rel}:{start + 1}: differs from `{marker}`")
        if changed:
            page.write_text("\n".join(lines) + "\n")
    return problems


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--write", action="store_true")
    args = ap.parse_args()
    problems = run(write=args.write)
    for p in problems:
        print(p)
    sys.exit(1 if problems and args.check else 0)
