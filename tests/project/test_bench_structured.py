"""``scripts/bench_structured.py --gradual`` trains the equal-budget dense model once and pairs
every later point with it: the numbers must be those the prune job computes when it trains the
baseline itself (``curvature.cli.jobs._add_intervals``), on units written by hand."""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from curvature.cli.jobs import _add_intervals
from curvature.tasks import stats

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_structured  # noqa: E402


def _units(rng, p):
    n = 200
    correct = (rng.random(n) < p).astype(float)
    label = rng.integers(0, 3, n)
    prediction = np.where(correct > 0, label, (label + 1) % 3)
    return {"id": list(range(n)), "correct": correct, "nll": rng.random(n), "tokens": np.ones(n),
            "label": label, "prediction": prediction}  # fmt: skip


def test_points_pair_with_the_baseline_of_the_first_job_as_the_job_would(tmp_path):
    rng = np.random.default_rng(0)
    dense, same_steps, pruned = _units(rng, 0.9), _units(rng, 0.95), _units(rng, 0.85)

    def metrics(names):
        units = {"dense": dense, "dense_equal_budget": same_steps, "pruned": pruned}
        m = {
            n: {
                "accuracy": stats.value(units[n], "accuracy"),
                "loss": stats.value(units[n], "loss"),
            }
            for n in names
        }
        return m, {n: units[n] for n in names}

    # what the job writes when it trains the baseline itself: the reference for this test
    want, units = metrics(("dense", "dense_equal_budget", "pruned"))
    _add_intervals(want, units, tmp_path / "want")
    # the first job of the bench trained the baseline; a later job did not
    base, out = tmp_path / "base", tmp_path / "out"
    _add_intervals(*metrics(("dense", "dense_equal_budget", "pruned")), base)
    want.update(steps=10, epochs=1.0)
    (base / "metrics.json").write_text(json.dumps(want))
    alone, units = metrics(("dense", "pruned"))
    alone.update(steps=10, epochs=1.0)
    _add_intervals(alone, units, out)
    assert alone["compared_with"] == "dense"
    point = {"metrics": copy.deepcopy(alone)}
    bench_structured.pair_with_baseline(point, base, out)
    got = point["metrics"]
    assert got["compared_with"] == "dense_equal_budget"
    assert got["dense_equal_budget_from"] == str(base)
    for key in ("accuracy_delta", "accuracy_delta_dense", "loss_delta", "loss_delta_dense"):
        for end in ("", "_ci_low", "_ci_high"):
            assert got["pruned"][key + end] == pytest.approx(want["pruned"][key + end]), key + end
    assert got["pies"] == want["pies"] != alone["pies"]  # counted against the same reference
    # the comparison moved: against the dense model before pruning it was the first
    assert got["pruned"]["accuracy_delta_dense"] == alone["pruned"]["accuracy_delta"]
    assert got["pruned"]["accuracy_delta"] != pytest.approx(alone["pruned"]["accuracy_delta"])


def test_a_point_of_another_budget_is_not_paired(tmp_path):
    rng = np.random.default_rng(1)
    base, out = tmp_path / "base", tmp_path / "out"
    u = _units(rng, 0.9)
    m = {
        "dense": {"accuracy": 0.9},
        "dense_equal_budget": {"accuracy": 0.9},
        "pruned": {"accuracy": 0.9},
    }
    _add_intervals(m, {"dense": u, "dense_equal_budget": u, "pruned": u}, base)
    (base / "metrics.json").write_text(json.dumps({**m, "steps": 10, "epochs": 1.0}))
    _add_intervals(m, {"dense": u, "pruned": u}, out)
    with pytest.raises(SystemExit, match="not the same budget"):
        bench_structured.pair_with_baseline(
            {"metrics": {**m, "steps": 20, "epochs": 2.0}}, base, out
        )
