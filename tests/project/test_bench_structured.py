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
    return {"id": list(range(n)), "correct": correct, "nll": rng.random(n), "tokens": np.ones(n)}


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
    (base / "metrics.json").write_text(json.dumps(want))
    alone, units = metrics(("dense", "pruned"))
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
    # the comparison moved: against the dense model before pruning it was the first
    assert got["pruned"]["accuracy_delta_dense"] == alone["pruned"]["accuracy_delta"]
    assert got["pruned"]["accuracy_delta"] != pytest.approx(alone["pruned"]["accuracy_delta"])
