"""Intervals, PIEs, per-class accuracy and calibration against ground truth and hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curvature.tasks import stats


def _cls_units(labels, preds, conf=None):
    labels, preds = np.asarray(labels), np.asarray(preds)
    return {
        "id": list(range(len(labels))),
        "label": labels,
        "prediction": preds,
        "confidence": np.full(len(labels), 0.9) if conf is None else np.asarray(conf, float),
        "correct": (labels == preds).astype(float),
    }


def test_accuracy_interval_covers_the_true_accuracy_at_the_nominal_rate():
    """300 validation sets of 200 examples from a model that is right with probability 0.8: the
    95% interval holds 0.8 in about 95% of them (binomial sd of the rate over 300 sets: 1.3%)."""
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(300):
        correct = (rng.random(200) < 0.8).astype(float)
        u = {"id": list(range(200)), "correct": correct}
        lo, hi = stats.interval(u, "accuracy", replicates=1000, seed=trial)
        hits += lo <= 0.8 <= hi
    assert 0.91 <= hits / 300 <= 0.985, hits / 300


def test_perplexity_interval_resamples_documents_and_covers_the_truth():
    """Documents of 20-200 tokens with a per-token loss of mean 3: the corpus perplexity is
    e^3; its interval (documents resampled, weighted by their tokens) covers it near 95%."""
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(200):
        tokens = rng.integers(20, 200, 150).astype(float)
        loss = rng.normal(3.0, 0.4, 150)
        u = {"id": list(range(150)), "nll": tokens * loss, "tokens": tokens}
        lo, hi = stats.interval(u, "perplexity", replicates=1000, seed=trial)
        assert lo < stats.value(u, "perplexity") < hi
        hits += lo <= math.exp(3.0) <= hi
    assert 0.89 <= hits / 200 <= 0.99, hits / 200


def test_paired_interval_is_narrower_than_unpaired_on_correlated_predictions():
    rng = np.random.default_rng(2)
    n = 500
    dense = (rng.random(n) < 0.85).astype(float)
    pruned = dense.copy()
    flip = rng.random(n) < 0.04  # pruning changes 4% of the answers
    pruned[flip] = 1 - pruned[flip]
    a = {"id": list(range(n)), "correct": pruned}
    b = {"id": list(range(n)), "correct": dense}
    diff, lo, hi = stats.paired_interval(a, b, "accuracy")
    ulo, uhi = stats.unpaired_interval(a, b, "accuracy")
    assert diff == pytest.approx(pruned.mean() - dense.mean())
    assert lo <= diff <= hi
    assert (hi - lo) < 0.5 * (uhi - ulo), (hi - lo, uhi - ulo)
    # a model that only ever loses answers: the paired interval excludes zero
    worse = dense.copy()
    worse[np.nonzero(dense)[0][:15]] = 0
    d, lo, hi = stats.paired_interval({"id": list(range(n)), "correct": worse}, b, "accuracy")
    assert d == pytest.approx(-15 / n) and hi < 0
    assert stats.unpaired_interval({"id": list(range(n)), "correct": worse}, b, "accuracy")[1] > 0


def test_paired_interval_aligns_units_by_id():
    a = {"id": [2, 0, 1], "correct": np.array([1.0, 0.0, 1.0])}
    b = {"id": [0, 1, 2], "correct": np.array([0.0, 1.0, 1.0])}
    d, lo, hi = stats.paired_interval(a, b, "accuracy", replicates=200)
    assert d == 0.0 and lo == hi == 0.0  # the same answers per id: every replicate's diff is 0
    with pytest.raises(ValueError, match="not of the same split"):
        stats.paired_interval({"id": [0, 1, 5], "correct": np.ones(3)}, b, "accuracy")


def test_seeds_mean_and_binary_f1_as_ratio_of_sums():
    u1 = _cls_units([1, 0, 1, 0, 1], [1, 1, 0, 0, 1])
    u2 = _cls_units([1, 0, 1, 0, 1], [1, 0, 1, 0, 1])
    assert stats.value([u1, u2], "accuracy") == pytest.approx((0.6 + 1.0) / 2)
    lo, hi = stats.interval([u1, u2], "accuracy", replicates=500)
    assert lo <= 0.8 <= hi
    # F1 of label 1 from per-example columns: tp 2, fp 1, fn 1 -> 4/6
    u1["f1_num"] = 2.0 * ((u1["prediction"] == 1) & (u1["label"] == 1))
    u1["f1_den"] = (u1["prediction"] == 1) + (u1["label"] == 1).astype(float)
    assert stats.value(u1, "f1") == pytest.approx(4 / 6)


def test_pies_and_per_class_equal_hand_counts():
    labels = [0, 0, 1, 1, 2, 2]
    dense = [_cls_units(labels, [0, 0, 1, 1, 2, 0])]
    # three seeds of the pruned model; the modal prediction per example:
    #   ex0: 0,0,1 -> 0   ex1: 1,1,0 -> 1 (PIE)   ex2: 1,1,1 -> 1
    #   ex3: 0,2,1 -> tie of three, the smallest label 0 (PIE)   ex4: 2,2,2 -> 2
    #   ex5: 0,2,2 -> 2 (PIE: dense said 0)
    seeds = [
        _cls_units(labels, [0, 1, 1, 0, 2, 0]),
        _cls_units(labels, [0, 1, 1, 2, 2, 2]),
        _cls_units(labels, [1, 0, 1, 1, 2, 2]),
    ]
    assert stats.modal_predictions(seeds).tolist() == [0, 1, 1, 0, 2, 2]
    got = stats.pies(seeds, dense)
    assert got == [
        {"id": 1, "label": 0, "dense": 0, "pruned": 1},
        {"id": 3, "label": 1, "dense": 1, "pruned": 0},
        {"id": 5, "label": 2, "dense": 0, "pruned": 2},
    ]
    # per class, the mean over seeds of each seed's accuracy on the class
    assert stats.per_class(seeds, 3) == pytest.approx(
        [(1 / 2 + 1 / 2 + 1 / 2) / 3, (1 / 2 + 1 / 2 + 2 / 2) / 3, (1 / 2 + 1 + 1) / 3]
    )
    per = stats.per_class(dense, 4)  # a label with no example: None
    assert per[:3] == pytest.approx([1.0, 1.0, 0.5]) and per[3] is None


def test_ece_equals_a_hand_computed_value():
    # bins of width 1/15; confidences 0.95 (bin 14), 0.95, 0.62 (bin 9), 0.62, 0.62, 0.3 (bin 4)
    conf = [0.95, 0.95, 0.62, 0.62, 0.62, 0.3]
    correct = [1, 0, 1, 1, 1, 0]
    # bin 14: acc 0.5, conf 0.95 -> 0.45 x 2/6; bin 9: acc 1, conf 0.62 -> 0.38 x 3/6;
    # bin 4: acc 0, conf 0.3 -> 0.3 x 1/6
    expected = 0.45 * 2 / 6 + 0.38 * 3 / 6 + 0.3 / 6
    assert stats.ece(conf, correct) == pytest.approx(expected)
    assert stats.ece([1.0, 1.0], [1, 1]) == 0.0  # confidence 1 falls in the last bin
    assert stats.ece([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.0)


def test_unit_files_round_trip(tmp_path):
    u = _cls_units([0, 2, 1], [0, 1, 1], conf=[0.5, 1 / 3, 0.123456789012345])
    stats.write_units(tmp_path / "p" / "x.csv", u)
    back = stats.read_units(tmp_path / "p" / "x.csv")
    assert back["id"] == [0, 1, 2]
    for k in ("label", "prediction", "confidence", "correct"):
        np.testing.assert_array_equal(back[k], np.asarray(u[k], float))
    assert not (tmp_path / "p" / "x.partial").exists()
