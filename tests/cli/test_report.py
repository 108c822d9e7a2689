"""The sweep report from a crafted sweep folder: every table and plot present in one page with no
external asset, the numbers equal to the saved predictions, and the page opened in a browser."""

from __future__ import annotations

import base64
import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from curvature.cli.main import main
from curvature.cli.report import render_folder
from curvature.cli.results import point_name
from curvature.tasks import stats

LABELS = ["business", "sport", "tech"]


def _point(method, target, seed=None, acc=0.0, **extra):
    p = {
        "method": method,
        "mask": "unstructured" if method != "dense" else "-",
        "mode": "oneshot" if method != "dense" else "-",
        "target_sparsity": target,
        "sparsity": target,
        "metric": "accuracy",
        "accuracy": acc,
        "loss": 0.5,
        "dense_bytes": 1000,
        "compressed_bytes": int(1000 * (1 - target / 2)),
        "prune_seconds": 1.0,
        "peak_memory_mb": 10.0,
        "params_kept": int(100 * (1 - target)),
        "latency_ms_dense": 10.0,
        "speed_batch": 16,
        "speed_seq_len": 128,
        "speed_device": "cpu",
        **extra,
    }
    if seed is not None:
        p.update(seed_index=seed, seed=seed)
    return p


@pytest.fixture()
def sweep_dir(tmp_path):
    """dense + two methods at 0.5 and 0.9, two seeds each; 90 examples of 3 classes."""
    rng = np.random.default_rng(0)
    n = 90
    labels = np.repeat(np.arange(3), 30)
    out = tmp_path / "sweep"
    (out / "predictions").mkdir(parents=True)
    dense_pred = np.where(rng.random(n) < 0.9, labels, (labels + 1) % 3)
    points = []

    def add(p, pred):
        units = {
            "id": list(range(n)),
            "label": labels,
            "prediction": pred,
            "confidence": rng.uniform(0.4, 1.0, n),
            "loss": rng.uniform(0, 1, n),
            "correct": (pred == labels).astype(float),
        }
        p["accuracy"] = float(units["correct"].mean())
        stats.write_units(out / "predictions" / f"{point_name(p)}.csv", units)
        points.append(p)

    add(_point("dense", 0.0), dense_pred)
    for method, damage in (("obs", 0.05), ("magnitude", 0.2)):
        for target in (0.5, 0.9):
            for seed in (0, 1):
                pred = dense_pred.copy()
                # the sports class suffers most
                hit = rng.random(n) < damage * (1 + 3 * (labels == 1)) * (target / 0.5)
                pred[hit] = (pred[hit] + 1) % 3
                add(_point(method, target, seed, latency_ms_csr=20.0 - 10 * target), pred)
    (out / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    (out / "sweep.json").write_text(json.dumps({"model": "m", "data": "d", "task": "t"}))
    (out / "predictions" / "labels.json").write_text(json.dumps(LABELS))
    (out / "predictions" / "texts.json").write_text(json.dumps([f"article {i}" for i in range(n)]))
    return out


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables = self.sections = 0
        self.images, self.external, self.headings = [], [], []
        self._h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tables += tag == "table"
        self.sections += tag == "section"
        if tag == "img":
            self.images.append(a)
        for key in ("src", "href"):
            if key in a and not a[key].startswith("data:"):
                self.external.append(a[key])
        self._h2 = tag == "h2"

    def handle_data(self, data):
        if self._h2:
            self.headings.append(data)
            self._h2 = False


def test_report_page_holds_every_table_and_plot_and_no_external_asset(sweep_dir, capsys):
    assert main(["report", str(sweep_dir)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = _Page()
    page.feed((sweep_dir / "report.html").read_text())
    assert page.external == []
    assert page.headings == [
        "Summary", "Results", "Metric against sparsity", "Metric against size on disk",
        "Metric against measured latency", "Per-class accuracy",
        "What pruning forgets: PIEs and calibration",
    ]  # fmt: skip
    assert page.tables == 4  # results, per-class drops, PIEs per point, first PIEs' texts
    assert len(page.images) == 3
    for img in page.images:
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert png == (sweep_dir / img["data-file"]).read_bytes()


def test_report_numbers_equal_the_predictions(sweep_dir):
    render_folder(sweep_dir)
    rows = {(r["method"], float(r["target_sparsity"])): r for r in
            csv.DictReader(open(sweep_dir / "results.csv"))}  # fmt: skip
    dense = stats.read_units(sweep_dir / "predictions" / "dense.csv")
    for (method, target), r in rows.items():
        if method == "dense":
            continue
        seeds = [
            stats.read_units(
                sweep_dir / "predictions" / f"{point_name(_point(method, target, s))}.csv"
            )
            for s in (0, 1)
        ]
        accs = [u["correct"].mean() for u in seeds]
        assert float(r["accuracy"]) == pytest.approx(np.mean(accs))
        assert float(r["accuracy_std"]) == pytest.approx(np.std(accs, ddof=1))
        assert float(r["accuracy_delta"]) == pytest.approx(np.mean(accs) - dense["correct"].mean())
        assert int(r["pies"]) == len(stats.pies(seeds, [dense]))
        assert float(r["ece"]) == pytest.approx(
            np.mean([stats.ece(u["confidence"], u["correct"]) for u in seeds])
        )
    # the heavily damaged magnitude 0.9 point is worse than dense beyond noise; the table says so
    md = (sweep_dir / "results.md").read_text()
    mag = next(
        line for line in md.splitlines() if line.startswith("| magnitude") and "0.90" in line
    )
    assert "worse" in mag
    pies = list(csv.DictReader(open(sweep_dir / "pies.csv")))
    assert {p["point"] for p in pies} == {f"{m} unstructured oneshot {t:g}"
                                          for m in ("obs", "magnitude") for t in (0.5, 0.9)}  # fmt: skip
    per_class = list(csv.DictReader(open(sweep_dir / "per_class.csv")))
    worst = min(per_class, key=lambda r: float(r["delta"]))
    assert worst["class"] == "sport"  # the class the crafted damage targets


def test_report_opens_in_a_browser(sweep_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    render_folder(sweep_dir)
    shot = tmp_path / "report.png"
    url = (sweep_dir / "report.html").resolve().as_uri()
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1280,2400", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    # a rendered page, not a blank one: text, table rules and plots give many distinct colours
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert dom.count("<table>") == 4 and dom.count("<img") == 3


def test_decoder_report_lists_the_documents_whose_loss_rose_most(tmp_path):
    out = tmp_path / "lm"
    (out / "predictions").mkdir(parents=True)
    tokens = np.array([50.0, 80.0, 20.0, 120.0])
    dense_loss = np.array([3.0, 2.5, 4.0, 3.2])
    rise = np.array([0.1, 0.9, 0.05, 0.4])  # document 1 suffers most, then 3
    points = []
    for p, loss in (
        (_point("dense", 0.0), dense_loss),
        (_point("sparsegpt", 0.5, 0), dense_loss + rise),
    ):
        p.update(
            metric="perplexity", perplexity=float(np.exp((loss * tokens).sum() / tokens.sum()))
        )
        p.pop("accuracy")
        units = {"id": [0, 1, 2, 3], "nll": loss * tokens, "tokens": tokens}
        stats.write_units(out / "predictions" / f"{point_name(p)}.csv", units)
        points.append(p)
    (out / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    (out / "predictions" / "texts.json").write_text(
        json.dumps(["doc a", "doc b", "doc c", "doc d"])
    )
    render_folder(out)
    md = (out / "report.md").read_text()
    section = md.split("## Documents that lost the most", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| sparsegpt")]
    assert [r.split(" | ")[1] for r in rows] == ["1", "3", "0", "2"]
    assert "+0.900" in rows[0] and "doc b" in rows[0]
    row = json.loads((out / "results.json").read_text())[1]
    assert row["perplexity_ci_low"] <= row["perplexity"] <= row["perplexity_ci_high"]
    assert row["perplexity_delta"] == pytest.approx(
        points[1]["perplexity"] - points[0]["perplexity"]
    )
    assert "pies" not in row and not (out / "pies.csv").exists()


def test_a_baseline_method_gets_paired_differences_and_the_share_of_its_damage_avoided(
    sweep_dir, capsys
):
    """``--baseline magnitude``: obs against magnitude at each target, paired on the same
    examples, and the share of magnitude's accuracy loss that obs avoids, both recomputed here
    from the predictions; the interval of the share covers its point value."""
    assert main(["report", str(sweep_dir), "--baseline", "magnitude"]) == 0
    rows = {(r["method"], float(r["target_sparsity"])): r for r in
            csv.DictReader(open(sweep_dir / "results.csv"))}  # fmt: skip
    dense = stats.read_units(sweep_dir / "predictions" / "dense.csv")["correct"].mean()

    def acc(method, target):
        return np.mean([
            stats.read_units(
                sweep_dir / "predictions" / f"{point_name(_point(method, target, s))}.csv"
            )["correct"].mean()
            for s in (0, 1)
        ])  # fmt: skip

    for target in (0.5, 0.9):
        r = rows[("obs", target)]
        a, m = acc("obs", target), acc("magnitude", target)
        assert float(r["accuracy_vs_base"]) == pytest.approx(a - m)
        share = 1 - (dense - a) / (dense - m)
        assert float(r["accuracy_gap_closed"]) == pytest.approx(share)
        lo, hi = float(r["accuracy_gap_closed_ci_low"]), float(r["accuracy_gap_closed_ci_high"])
        assert lo <= share <= hi
        assert r["baseline"] == "magnitude"
        assert rows[("magnitude", target)]["accuracy_vs_base"] == ""  # not against itself
    assert float(rows[("obs", 0.9)]["accuracy_vs_base_ci_low"]) > 0  # obs better beyond noise
    md = (sweep_dir / "results.md").read_text()
    assert "vs magnitude, paired [95% CI]" in md and "share of magnitude's damage avoided" in md
    assert (sweep_dir / "against_baseline.png").stat().st_size > 5000
    assert "against_baseline.png" in (sweep_dir / "report.md").read_text()
    render_folder(sweep_dir, baseline=None)  # the sweep.json baseline is not set: plot removed
    assert not (sweep_dir / "against_baseline.png").exists()
    assert main(["report", str(sweep_dir), "--baseline", "sparsegpt"]) == 2
    assert "--baseline 'sparsegpt': no point of that method" in capsys.readouterr().err


def test_a_baseline_comparison_pairs_the_seeds_both_methods_ran(sweep_dir):
    """Two data-reading methods with different numbers of seeds: only the common seeds are
    compared (the same calibration draws), not one seed against another seed's mean."""
    lines = [json.loads(x) for x in (sweep_dir / "points.jsonl").read_text().splitlines()]
    keep = []
    for p in lines:
        if p["method"] == "magnitude":
            if p["target_sparsity"] == 0.5 and p["seed_index"] == 1:
                continue  # mfac at 0.5 has seed 0 only
            old = sweep_dir / "predictions" / f"{point_name(p)}.csv"
            p["method"] = "mfac"
            shutil.move(old, sweep_dir / "predictions" / f"{point_name(p)}.csv")
        keep.append(p)
    (sweep_dir / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in keep))
    render_folder(sweep_dir, baseline="obs")
    rows = {(r["method"], float(r["target_sparsity"])): r for r in
            csv.DictReader(open(sweep_dir / "results.csv"))}  # fmt: skip

    def acc(method, target, seed):
        p = _point(method, target, seed)
        return stats.read_units(sweep_dir / "predictions" / f"{point_name(p)}.csv")[
            "correct"
        ].mean()

    r = rows[("mfac", 0.5)]
    assert float(r["accuracy_vs_base"]) == pytest.approx(acc("mfac", 0.5, 0) - acc("obs", 0.5, 0))
    r = rows[("mfac", 0.9)]
    both = np.mean([acc("mfac", 0.9, s) - acc("obs", 0.9, s) for s in (0, 1)])
    assert float(r["accuracy_vs_base"]) == pytest.approx(both)
