"""A latency table measured on this machine: the model's forward time at each size of its heads and
feed-forward neurons (the same size in every block), for a target speed-up.

For each number of heads kept (key/value heads, with their query heads) the model is copied, every
block's attention shrinks to that size (the feed-forward kept whole) and one batch is timed; the
same for each level of neurons kept (the attention whole). A size pair is predicted to take

    L(heads, neurons) = L(heads, all) + L(all, neurons) - L(all, all)

(the two modules' times add up across the blocks). The table and its own cost (seconds) are
recorded; :func:`measure_model` times the pruned model itself, so the report gives the predicted
and the measured speed-up side by side.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch

from curvature.integrations.speed import _median
from curvature.pruning import structures


def measure_model(model, batch: dict, reps: int = 7) -> float:
    """Median forward time (ms) of ``model`` on ``batch`` under ``torch.inference_mode``."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return 1e3 * _median(lambda: model(**batch), reps)
    finally:
        model.train(was)


@dataclass
class LatencyTable:
    """Forward times (ms) of the whole model per size kept in every block."""

    batch_size: int
    sequence_length: int
    threads: int
    dense_ms: float
    #: key/value heads kept per block -> ms (feed-forward whole)
    heads: dict = field(default_factory=dict)
    #: neurons kept per block -> ms (attention whole)
    neurons: dict = field(default_factory=dict)
    seconds: float = 0.0

    def predict(self, heads: int | None, neurons: int | None) -> float:
        h = self.heads.get(heads, self.dense_ms) if heads is not None else self.dense_ms
        n = self.neurons.get(neurons, self.dense_ms) if neurons is not None else self.dense_ms
        return h + n - self.dense_ms

    def as_dict(self) -> dict:
        out = asdict(self)
        out["heads"] = {str(k): v for k, v in self.heads.items()}
        out["neurons"] = {str(k): v for k, v in self.neurons.items()}
        return out


def neuron_levels(count: int, steps: int = 16) -> list[int]:
    """The neuron counts the table measures: ``count * i / steps`` (rounded), ``i = 1..steps``."""
    return sorted({max(1, round(count * i / steps)) for i in range(1, steps + 1)})


def _shrunk(model, batch, kind: str, kept: int):
    net = copy.deepcopy(model).eval()
    for g in structures.trace(net, lambda: net(**batch), kinds=(kind,)):
        structures.shrink(g, list(range(min(kept, g.count))))
    return net


def _paired(dense, model, batch, reps: int, rounds: int) -> float:
    """``ms(model) / ms(dense)``: the two timed alternately ``rounds`` times, the median ratio
    (drift in the machine's speed cancels within each pair)."""
    ratios = []
    for _ in range(rounds):
        d = measure_model(dense, batch, reps)
        ratios.append(measure_model(model, batch, reps) / d)
    return sorted(ratios)[len(ratios) // 2]


def _envelope(times: dict, dense_ms: float) -> dict:
    """Never faster with more kept: each time at least the time of every smaller size, and at
    most the dense model's."""
    out, worst = {}, 0.0
    for k in sorted(times):
        worst = max(worst, times[k])
        out[k] = min(worst, dense_ms)
    return out


def measure_table(
    model, batch: dict, kinds=structures.KINDS, reps: int = 7, steps: int = 16, rounds: int = 3
):
    """The :class:`LatencyTable` of ``model`` on ``batch`` (a dict of tensors, no labels).

    The dense model is timed as a copy, like every smaller size (the same memory treatment); each
    size is timed alternately with the dense copy ``rounds`` times and kept as the dense time times
    the median ratio; a size is never recorded faster than a smaller one (the measured noise
    otherwise makes the planner pick sizes that are not faster)."""
    start = time.perf_counter()
    batch = {k: v for k, v in batch.items() if k != "labels"}
    ids = batch["input_ids"]
    groups = structures.trace(model, lambda: model(**batch), kinds=tuple(kinds))
    counts = {g.kind: g.count for g in groups}
    dense = copy.deepcopy(model).eval()
    dense_ms = sorted(measure_model(dense, batch, reps) for _ in range(rounds))[rounds // 2]
    table = LatencyTable(
        batch_size=int(ids.shape[0]),
        sequence_length=int(ids.shape[1]),
        threads=torch.get_num_threads(),
        dense_ms=dense_ms,
    )

    def timed(kind, kept):
        return dense_ms * _paired(dense, _shrunk(model, batch, kind, kept), batch, reps, rounds)

    if structures.HEADS in counts:
        for k in range(1, counts[structures.HEADS]):
            table.heads[k] = timed(structures.HEADS, k)
        table.heads[counts[structures.HEADS]] = dense_ms
        table.heads = _envelope(table.heads, dense_ms)
    if structures.NEURONS in counts:
        levels = neuron_levels(counts[structures.NEURONS], steps)
        for n in levels[:-1]:
            table.neurons[n] = timed(structures.NEURONS, n)
        table.neurons[levels[-1]] = dense_ms
        table.neurons = _envelope(table.neurons, dense_ms)
    table.seconds = time.perf_counter() - start
    return table
