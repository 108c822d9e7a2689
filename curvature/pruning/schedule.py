"""Sparsity schedules for gradual pruning.

With ``x = (epoch - start_epoch) / (end_epoch - start_epoch)`` clipped to ``[0, 1]`` and
``y = f(x)``, the sparsity is ``init + (final - init) * y`` where ``f`` is

- ``cubic``: ``1 - (1 - x)^3`` (fast early, slow late; the oBERT default),
- ``linear``: ``x``,
- ``inverse_cubic``: ``x^3`` (slow early, fast late).

Pruning happens at ``start_epoch`` and then every ``update_frequency`` epochs until
``end_epoch``; between those points the sparsity stays at the last applied value.
"""

from __future__ import annotations

import math

from curvature.core import checks

INTER_FUNCS = ("cubic", "linear", "inverse_cubic")


def interpolate(x: float, inter_func: str = "cubic") -> float:
    x = min(1.0, max(0.0, x))
    if inter_func == "cubic":
        return 1.0 - (1.0 - x) ** 3
    if inter_func == "linear":
        return x
    if inter_func == "inverse_cubic":
        return x**3
    checks.one_of("inter_func", inter_func, INTER_FUNCS)
    raise AssertionError("unreachable")


def sparsity_at(
    epoch: float,
    *,
    init_sparsity: float,
    final_sparsity: float,
    start_epoch: float,
    end_epoch: float,
    update_frequency: float,
    inter_func: str = "cubic",
) -> float | None:
    """Sparsity of the last scheduled pruning point at or before ``epoch`` (None before start)."""
    if epoch < start_epoch - 1e-9:
        return None
    if end_epoch <= start_epoch:
        return final_sparsity
    last = min(epoch, end_epoch)
    if update_frequency > 0:
        k = math.floor((last - start_epoch) / update_frequency + 1e-9)
        last = min(end_epoch, start_epoch + k * update_frequency)
        if epoch >= end_epoch - 1e-9:
            last = end_epoch
    x = (last - start_epoch) / (end_epoch - start_epoch)
    return init_sparsity + (final_sparsity - init_sparsity) * interpolate(x, inter_func)


def pruning_points(*, start_epoch: float, end_epoch: float, update_frequency: float) -> list[float]:
    """The epochs at which a gradual schedule prunes (start, every update_frequency, end)."""
    if end_epoch <= start_epoch or update_frequency <= 0:
        return [start_epoch]
    pts, e = [], start_epoch
    while e < end_epoch - 1e-9:
        pts.append(round(e, 9))
        e += update_frequency
    pts.append(end_epoch)
    return pts
