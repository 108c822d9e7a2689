"""What a metric is worth: bootstrap intervals, paired differences, calibration, and the examples
a pruned model forgets.

Every evaluation of :mod:`curvature.tasks.kinds` returns, beside its metrics, a table of
**units** (``ev["units"]``): one row per evaluation example (classification, question answering),
per validation document (causal LM) or per masked block (masked LM), with an ``id`` column that
is the same for every model evaluated on the same split. Every metric of this toolkit is a ratio
of sums over those units, ``g(sum(num) / sum(den))``:

==============  =====================================  ===============  ==========
metric          numerator column                       denominator      ``g``
==============  =====================================  ===============  ==========
accuracy        ``correct`` (0/1)                      1 per example    identity
f1 (2 labels)   ``f1_num`` = 2 [pred = 1 and label = 1]  ``f1_den`` = [pred = 1] + [label = 1]  identity
loss            ``loss`` (per example) or ``nll``      1 or ``tokens``  identity
perplexity      ``nll``                                ``tokens``       exp
exact_match/f1  per-question score (QA)                1                identity
==============  =====================================  ===============  ==========

so one resampling scheme serves all of them. A bootstrap replicate draws the units with
replacement (multinomial counts ``w``) and recomputes ``g(w @ num / w @ den)``: for perplexity
that resamples documents and weights them by their tokens, as the metric itself does.

- :func:`interval`: the percentile bootstrap interval of a metric;
- :func:`paired_interval`: of the difference between two models on the same units, both
  recomputed on the **same** replicate, so the examples' shared difficulty cancels (the interval
  is narrower than one from independent replicates whenever the models' errors are correlated);
- with several seeds (a list of unit tables per model), the statistic is the mean of the metric
  over seeds under one shared replicate: the interval covers example sampling, and the spread
  over seeds is reported beside it;
- :func:`ece`, :func:`per_class`, :func:`modal_predictions` and :func:`pies` for what the
  top-line number hides.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import numpy as np

LEVEL = 0.95
REPLICATES = 2000


def _cols(units: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "accuracy":
        num = np.asarray(units["correct"], float)
        return num, np.ones_like(num)
    if metric == "f1" and "f1_num" in units:
        return np.asarray(units["f1_num"], float), np.asarray(units["f1_den"], float)
    if metric in ("loss", "perplexity") and "nll" in units:
        return np.asarray(units["nll"], float), np.asarray(units["tokens"], float)
    if metric in units:
        num = np.asarray(units[metric], float)
        return num, np.ones_like(num)
    raise KeyError(f"the units have no column for metric {metric!r}: {sorted(units)}")


def has_metric(units: dict, metric: str) -> bool:
    try:
        _cols(units, metric)
    except KeyError:
        return False
    return True


def _value(num, den, metric):
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    if metric == "f1":
        r = np.where(den == 0, 0.0, r)  # no positive prediction nor label: F1 0, as computed
    return np.exp(np.minimum(r, 700.0)) if metric == "perplexity" else r


def value(units: dict | list[dict], metric: str) -> float:
    """The metric of one unit table, or its mean over a list (one table per seed)."""
    tables = units if isinstance(units, list) else [units]
    vals = []
    for u in tables:
        num, den = _cols(u, metric)
        vals.append(float(_value(num.sum(), den.sum(), metric)))
    return float(np.mean(vals))


def _weights(n: int, replicates: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(float)


def _replicates(tables: list[dict], metric: str, w: np.ndarray) -> np.ndarray:
    """The seed-mean metric under each replicate's weights (rows of ``w``)."""
    out = np.zeros(len(w))
    for u in tables:
        num, den = _cols(u, metric)
        out += _value(w @ num, w @ den, metric)
    return out / len(tables)


def _aligned(tables: list[dict], ids) -> list[dict]:
    """The tables reordered to ``ids`` (every table must hold exactly those ids)."""
    out = []
    for u in tables:
        mine = list(u["id"])
        if mine == list(ids):
            out.append(u)
            continue
        where = {k: i for i, k in enumerate(mine)}
        missing = [k for k in ids if k not in where]
        if missing or len(mine) != len(ids):
            raise ValueError(
                f"the evaluations cover different units ({len(mine)} and {len(ids)}; e.g. "
                f"{missing[:1] or '-'} missing): they are not of the same split"
            )
        idx = np.array([where[k] for k in ids])
        out.append({k: np.asarray(v)[idx] for k, v in u.items()})
    return out


def _percentiles(x: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.nanpercentile(x, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


def interval(
    units: dict | list[dict],
    metric: str,
    *,
    level: float = LEVEL,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``metric`` over the units (the mean over seeds when
    ``units`` is a list of tables of the same ids)."""
    tables = units if isinstance(units, list) else [units]
    tables = _aligned(tables, tables[0]["id"])
    w = _weights(len(tables[0]["id"]), replicates, seed)
    return _percentiles(_replicates(tables, metric, w), level)


def paired_interval(
    units: dict | list[dict],
    reference: dict | list[dict],
    metric: str,
    *,
    level: float = LEVEL,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(difference, low, high)`` of ``metric(units) - metric(reference)`` on the same units,
    with both recomputed on each shared replicate (a paired bootstrap)."""
    a = units if isinstance(units, list) else [units]
    b = reference if isinstance(reference, list) else [reference]
    ids = b[0]["id"]
    a, b = _aligned(a, ids), _aligned(b, ids)
    w = _weights(len(ids), replicates, seed)
    diffs = _replicates(a, metric, w) - _replicates(b, metric, w)
    lo, hi = _percentiles(diffs, level)
    return value(a, metric) - value(b, metric), lo, hi


def gap_interval(
    units: dict | list[dict],
    baseline: dict | list[dict],
    dense: dict | list[dict],
    metric: str,
    *,
    level: float = LEVEL,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(share, low, high)``: the share of the baseline's damage that ``units`` avoid,
    ``1 - (m(units) - m(dense)) / (m(baseline) - m(dense))``, with all three recomputed on each
    shared replicate (paired). 0.2 means 20% less loss of quality than the baseline; 1, none
    left; negative, more than the baseline. Replicates where the baseline equals dense are
    dropped from the interval (undefined share)."""
    tables = [t if isinstance(t, list) else [t] for t in (units, baseline, dense)]
    ids = tables[2][0]["id"]
    a, b, d = (_aligned(t, ids) for t in tables)
    w = _weights(len(ids), replicates, seed)
    ra, rb, rd = (_replicates(t, metric, w) for t in (a, b, d))
    damage = rb - rd
    ok = damage != 0
    share = 1 - (ra[ok] - rd[ok]) / damage[ok]
    va, vb, vd = value(a, metric), value(b, metric), value(d, metric)
    point = 1 - (va - vd) / (vb - vd) if vb != vd else float("nan")
    lo, hi = _percentiles(share, level) if ok.any() else (float("nan"), float("nan"))
    return point, lo, hi


def unpaired_interval(
    units: dict, reference: dict, metric: str, *, level=LEVEL, replicates=REPLICATES, seed=0
) -> tuple[float, float]:
    """The difference's interval from independent replicates of each model (what an analysis
    that ignores the pairing would report; for comparison with :func:`paired_interval`)."""
    n = len(reference["id"])
    wa, wb = _weights(n, replicates, seed), _weights(n, replicates, seed + 1)
    diffs = _replicates([units], metric, wa) - _replicates([reference], metric, wb)
    return _percentiles(diffs, level)


def ece(confidence, correct, bins: int = 15) -> float:
    """Expected calibration error: equal-width confidence bins over (0, 1], the gap
    ``|accuracy - mean confidence|`` of each bin weighted by its share of the examples."""
    conf = np.asarray(confidence, float)
    ok = np.asarray(correct, float)
    if len(conf) == 0:
        raise ValueError("ece needs at least one example")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(ok[sel].mean() - conf[sel].mean())
    return float(total)


def modal_predictions(tables: list[dict]) -> np.ndarray:
    """Per unit, the most frequent prediction across the tables (seeds); a tie goes to the
    smallest label, so the result does not depend on the order of the seeds."""
    preds = np.stack([np.asarray(u["prediction"]) for u in tables])
    out = np.empty(preds.shape[1], dtype=preds.dtype)
    for j in range(preds.shape[1]):
        counts = Counter(preds[:, j].tolist())
        top = max(counts.values())
        out[j] = min(k for k, c in counts.items() if c == top)
    return out


def pies(pruned: list[dict], dense: list[dict]) -> list[dict]:
    """Pruning-identified exemplars: the units whose modal prediction across the pruned model's
    seeds differs from the dense model's modal prediction. One dict per exemplar: ``id``,
    ``label``, ``dense``, ``pruned``."""
    ids = dense[0]["id"]
    pruned, dense = _aligned(pruned, ids), _aligned(dense, ids)
    p, d = modal_predictions(pruned), modal_predictions(dense)
    labels = np.asarray(dense[0]["label"])
    return [
        {"id": ids[i], "label": int(labels[i]), "dense": int(d[i]), "pruned": int(p[i])}
        for i in np.nonzero(p != d)[0]
    ]


def per_class(units: dict | list[dict], num_labels: int) -> list[float | None]:
    """Accuracy on each label's examples (mean over seeds); ``None`` for a label with none."""
    tables = units if isinstance(units, list) else [units]
    out = []
    for c in range(num_labels):
        accs = []
        for u in tables:
            sel = np.asarray(u["label"]) == c
            if sel.any():
                accs.append(float(np.asarray(u["correct"], float)[sel].mean()))
        out.append(float(np.mean(accs)) if accs else None)
    return out


# ------------------------------------------------------------------------------ unit files


def write_units(path: Path, units: dict) -> None:
    """One CSV per evaluation: the unit columns (``id`` first), compact and readable anywhere."""
    cols = ["id", *[c for c in units if c != "id"]]
    n = len(units["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for i in range(n):
            w.writerow([_fmt(units[c][i]) for c in cols])
    tmp.replace(path)


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v)) if math.isfinite(v) else str(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def read_units(path: Path) -> dict:
    """A unit file back as columns: ``id`` as written, numbers as numpy arrays."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path}: empty unit file")
    head, body = rows[0], rows[1:]
    out: dict = {}
    for j, c in enumerate(head):
        col = [r[j] for r in body]
        if c == "id":
            out[c] = [int(x) if x.lstrip("-").isdigit() else x for x in col]
            continue
        try:
            out[c] = np.array([float(x) for x in col])
        except ValueError:
            out[c] = col
    return out


__all__ = [
    "LEVEL",
    "REPLICATES",
    "ece",
    "has_metric",
    "interval",
    "modal_predictions",
    "paired_interval",
    "per_class",
    "pies",
    "read_units",
    "unpaired_interval",
    "value",
    "write_units",
]
