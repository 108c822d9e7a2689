"""Reports a user can decide from: a sweep or a prune run as Markdown and as one self-contained
HTML page (tables and plots inline, no external assets, readable offline).

A sweep's report holds the table with 95% intervals and paired differences against dense, the
plots (metric against sparsity, size on disk and measured latency), the per-class accuracy with
the largest drops, the pruning-identified exemplars (PIEs: examples whose modal prediction the
pruning changed) with the first few texts, calibration (ECE), and for decoders the documents
whose loss rose the most. ``curvature report DIR`` renders either kind of folder again.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

from curvature.cli.outputs import SweepError
from curvature.cli.results import (
    aggregate,
    columns,
    groups,
    load_points,
    load_units,
    markdown_table,
    plot,
    plot_baseline,
    render_report,
)

SHOW_EXAMPLES = 5  # texts of the first PIEs / worst documents shown per point


def _label(row: dict) -> str:
    return f"{row['method']} {row['mask']} {row['mode']} {row['target_sparsity']:g}"


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------- analyses


def _loaded(folder: Path, points: list[dict]):
    """``(dense units or None, [(points of a group, their units per seed)])`` for every
    non-dense group whose predictions are all saved."""
    by_key = groups(points)
    dense = by_key.get(("dense", "-", "-", 0.0))
    d_units = load_units(folder, dense[0]) if dense else None
    loaded = []
    for key, pts in by_key.items():
        if key[0] == "dense":
            continue
        units = [load_units(folder, p) for p in pts]
        if all(u is not None for u in units):
            loaded.append((pts, units))
    return d_units, loaded


def pies_rows(folder: Path, points: list[dict]) -> list[dict]:
    """Every PIE of every point: example id, label, dense and pruned (modal) prediction, point."""
    from curvature.tasks import stats

    d_units, loaded = _loaded(folder, points)
    if d_units is None or "prediction" not in d_units:
        return []
    out = []
    for pts, units in loaded:
        for e in stats.pies(units, [d_units]):
            out.append({**e, "point": _label(pts[0])})
    return out


def class_table(folder: Path, points: list[dict]) -> tuple[list[str], list[dict]]:
    """Per point, each class's accuracy and its change against dense (mean over seeds)."""
    from curvature.tasks import stats

    d_units, loaded = _loaded(folder, points)
    if d_units is None or "label" not in d_units:
        return [], []
    names = _json(folder / "predictions" / "labels.json")
    k = int(max(d_units["label"])) + 1
    names = names if names and len(names) >= k else [str(i) for i in range(k)]
    base = stats.per_class(d_units, len(names))
    rows = []
    for pts, units in loaded:
        acc = stats.per_class(units, len(names))
        for c, name in enumerate(names):
            if acc[c] is None:
                continue
            n = int((d_units["label"] == c).sum())
            rows.append({
                "point": _label(pts[0]), "class": name, "examples": n, "dense": base[c],
                "pruned": acc[c], "delta": acc[c] - base[c],
            })  # fmt: skip
    return names, rows


def document_rows(folder: Path, points: list[dict], top: int = SHOW_EXAMPLES) -> list[dict]:
    """Decoders: per point, the documents whose loss (nats per token) rose the most."""
    d_units, loaded = _loaded(folder, points)
    if d_units is None or "nll" not in d_units:
        return []
    # a unit with no scored token (a masked-LM block where nothing was masked) has no loss
    base = {i: n / t for i, n, t in zip(d_units["id"], d_units["nll"], d_units["tokens"]) if t}
    out = []
    for pts, units in loaded:
        rise: dict = {}
        for u in units:
            for i, n, t in zip(u["id"], u["nll"], u["tokens"]):
                if t and i in base:
                    rise[i] = rise.get(i, 0.0) + (n / t - base[i]) / len(units)
        for i in sorted(rise, key=lambda i: -rise[i])[:top]:
            out.append({
                "point": _label(pts[0]), "document": i, "dense_loss": base[i],
                "loss_rise": rise[i],
                "tokens": int(d_units["tokens"][list(d_units["id"]).index(i)]),
            })  # fmt: skip
    return out


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------- Markdown


def _md_table(head: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return lines


def _snippet(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def sweep_sections(folder: Path, rows: list[dict], points: list[dict]) -> list[tuple]:
    """The report as sections: ``(title, markdown lines, image file or None)``."""
    cfg = _json(folder / "sweep.json") or {}
    texts = _json(folder / "predictions" / "texts.json")
    metric = rows[0].get("metric", "accuracy")
    seeds = max(r.get("seeds", 1) for r in rows)
    intro = [
        f"- model `{cfg.get('model', '?')}`, data `{cfg.get('data', '?')}`, task "
        f"{cfg.get('task', '?')}, judged by validation {metric}",
        f"- {seeds} calibration/fine-tuning seed(s) per point; intervals are 95% percentile "
        "bootstrap intervals over the evaluation examples (documents for a decoder); the "
        "difference against dense is a paired bootstrap on the same examples, and a point is "
        "called better or worse than dense only when that interval excludes zero",
    ]
    if seeds > 1:
        intro.append("- `+- x`: the standard deviation of the point's metric over its seeds")
    sections = [("Summary", intro, None), ("Results", markdown_table(rows).splitlines(), None)]
    for name, what in (
        ("accuracy_vs_sparsity.png", "Metric against sparsity"),
        ("metric_vs_size.png", "Metric against size on disk"),
        ("metric_vs_latency.png", "Metric against measured latency"),
        ("against_baseline.png", "Against the baseline method"),
    ):
        if (folder / name).is_file():
            sections.append((what, [], name))

    names, cls = class_table(folder, points)
    if cls:
        worst = sorted(cls, key=lambda r: r["delta"])[:10]
        lines = ["The ten largest per-class drops against dense (mean over seeds):", ""]
        lines += _md_table(
            ["point", "class", "examples", "dense", "pruned", "change"],
            [[r["point"], r["class"], r["examples"], f"{r['dense']:.3f}", f"{r['pruned']:.3f}",
              f"{r['delta']:+.3f}"] for r in worst],
        )  # fmt: skip
        sections.append(("Per-class accuracy", lines, None))

    pies = pies_rows(folder, points)
    dense_units = None
    by_key = groups(points)
    if ("dense", "-", "-", 0.0) in by_key:
        dense_units = load_units(folder, by_key[("dense", "-", "-", 0.0)][0])
    if dense_units is not None and "prediction" in dense_units:
        n = len(dense_units["id"])
        lines = [
            "Examples whose prediction pruning changed (with several seeds: the modal prediction "
            f"across seeds), out of {n} evaluation examples; all of them are in `pies.csv`.",
            "",
        ]
        body = []
        for r in rows:
            if r["method"] == "dense" or "pies" not in r:
                continue
            mine = [p for p in pies if p["point"] == _label(r)]
            by_class: dict = {}
            for p in mine:
                key = names[p["label"]] if names and p["label"] < len(names) else str(p["label"])
                by_class[key] = by_class.get(key, 0) + 1
            share = ", ".join(
                f"{k} {v}" for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])
            )
            body.append([_label(r), f"{len(mine)} ({len(mine) / n:.1%})", share or "-",
                         f"{r.get('ece', float('nan')):.3f}"])  # fmt: skip
        d_row = next((r for r in rows if r["method"] == "dense"), None)
        lines += _md_table(["point", "PIEs", "by true class", "ECE"], body)
        if d_row is not None and "ece" in d_row:
            lines += ["", f"Dense ECE: {d_row['ece']:.3f} (15 equal-width confidence bins)."]
        if texts and mine_texts(pies, texts):
            lines += ["", "The first PIEs of the sparsest point of each curve:", ""]
            lines += _md_table(
                ["point", "id", "true", "dense", "pruned", "text"],
                [[p["point"], p["id"], _name(names, p["label"]), _name(names, p["dense"]),
                  _name(names, p["pruned"]), _snippet(texts[p["id"]]).replace("|", "/")]
                 for p in mine_texts(pies, texts)],
            )  # fmt: skip
        sections.append(("What pruning forgets: PIEs and calibration", lines, None))

    docs = document_rows(folder, points)
    if docs:
        lines = [
            "Per point, the validation documents whose loss (nats per token) rose the most:",
            "",
        ]
        lines += _md_table(
            ["point", "document", "tokens", "dense loss", "rise", "text"],
            [[d["point"], d["document"], d["tokens"], f"{d['dense_loss']:.3f}",
              f"{d['loss_rise']:+.3f}",
              _snippet(texts[d["document"]]).replace("|", "/") if texts else ""] for d in docs],
        )  # fmt: skip
        sections.append(("Documents that lost the most", lines, None))
    return sections


def _name(names, i) -> str:
    return names[i] if names and 0 <= i < len(names) else str(i)


def mine_texts(pies: list[dict], texts: list[str]) -> list[dict]:
    """The first :data:`SHOW_EXAMPLES` PIEs of the last point listed for each curve."""
    by_point: dict[str, list] = {}
    for p in pies:
        by_point.setdefault(p["point"], []).append(p)
    out = []
    curves: dict[str, str] = {}
    for point in by_point:  # the label ends with the target: keep each curve's largest
        curve, target = point.rsplit(" ", 1)
        if curve not in curves or float(target) > float(curves[curve].rsplit(" ", 1)[1]):
            curves[curve] = point
    for point in curves.values():
        out += [p for p in by_point[point] if p["id"] < len(texts)][:SHOW_EXAMPLES]
    return out


def _markdown(title: str, sections: list[tuple]) -> str:
    lines = [f"# {title}", ""]
    for head, body, image in sections:
        lines += [f"## {head}", ""]
        if image:
            lines += [f"![{head}]({image})", ""]
        lines += [*body, ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- HTML

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
    "th{background:#f2f2f2}img{max-width:100%;border:1px solid #ddd}h2{margin-top:1.6em}"
)


def _md_to_html(lines: list[str]) -> str:
    """The few Markdown forms the sections use: tables, bullets and paragraphs."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            cells = [[c.strip() for c in row.strip().strip("|").split(" | ")] for row in block]
            head, body = cells[0], [r for r in cells[2:]]
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                    for r in body
                )
                + "</tbody></table>"
            )
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(lines[i][2:])
                i += 1
            out.append("<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in items) + "</ul>")
            continue
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out)


def _html(title: str, sections: list[tuple], folder: Path) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for head, body, image in sections:
        parts.append(f"<section><h2>{html.escape(head)}</h2>")
        if image:
            data = base64.b64encode((folder / image).read_bytes()).decode()
            parts.append(
                f'<figure><img alt="{html.escape(head)}" data-file="{html.escape(image)}" '
                f'src="data:image/png;base64,{data}"></figure>'
            )
        parts.append(_md_to_html(body))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------ entries


def write_sweep_report(folder: Path, rows: list[dict], points: list[dict] | None = None) -> None:
    """pies.csv, per_class.csv, the size and latency plots, report.md and report.html."""
    folder = Path(folder)
    points = load_points(folder) if points is None else points
    pies = pies_rows(folder, points)
    if pies:
        _write_csv(folder / "pies.csv", pies, ["id", "label", "dense", "pruned", "point"])
    elif _classified(folder):  # a classification sweep with no PIE (yet): the header alone
        _write_csv(folder / "pies.csv", [], ["id", "label", "dense", "pruned", "point"])
    _, cls = class_table(folder, points)
    if cls:
        _write_csv(folder / "per_class.csv", cls,
                   ["point", "class", "examples", "dense", "pruned", "delta"])  # fmt: skip
    if any("compressed_bytes" in r for r in rows):
        plot(rows, folder / "metric_vs_size.png", x="size")
    if any("latency_ms_dense" in r for r in rows):
        plot(rows, folder / "metric_vs_latency.png", x="latency")
    if not plot_baseline(rows, folder / "against_baseline.png"):
        (folder / "against_baseline.png").unlink(missing_ok=True)
    sections = sweep_sections(folder, rows, points)
    title = f"Sparsity sweep: {folder.resolve().name}"
    _write(folder / "report.md", _markdown(title, sections))
    _write(folder / "report.html", _html(title, sections, folder))


def _classified(folder: Path) -> bool:
    path = folder / "predictions" / "dense.csv"
    if not path.is_file():
        return False
    with open(path) as fh:
        return "prediction" in fh.readline().strip().split(",")


def prune_sections(metrics: dict) -> list[tuple]:
    return [("Run", render_report(metrics).splitlines()[2:], None)]


def write_prune_report(folder: Path) -> None:
    folder = Path(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    title = f"Pruning run: {folder.resolve().name}"
    _write(folder / "report.html", _html(title, prune_sections(metrics), folder))


def render(
    folder: str | Path, points: list[dict] | None = None, baseline: str | None = None
) -> None:
    """Write results.csv|json|md, the plots and the report of a sweep folder from its points and
    saved predictions (intervals, seeds, PIEs and calibration are computed here). ``baseline``:
    a method to compare every other with (default: the one ``sweep.json`` records, if any)."""
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
    write_sweep_report(folder, rows, points)


def render_folder(folder: str | Path, baseline: str | None = None) -> Path:
    """Render a sweep folder (``points.jsonl``) or a prune run (``metrics.json``) again; returns
    the Markdown file written. ``baseline``: a sweep's method to compare the others with."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SweepError(f"report: {folder} is not a folder")
    if (folder / "points.jsonl").is_file():
        render(folder, baseline=baseline)
        return folder / "report.md"
    if (folder / "metrics.json").is_file():
        if baseline is not None:
            raise SweepError("report: --baseline compares the methods of a sweep folder")
        metrics = json.loads((folder / "metrics.json").read_text())
        _write(folder / "report.md", render_report(metrics))
        write_prune_report(folder)
        return folder / "report.md"
    raise SweepError(
        f"report: {folder} holds neither a sweep (points.jsonl) nor a prune run (metrics.json)"
    )


__all__ = ["render", "render_folder", "write_prune_report", "write_sweep_report"]
