"""Argument checks shared by the core estimators.

Every check raises ``ValueError`` with a message that names the argument, so that a user
mistake reads as a sentence and never as a deep traceback from a matrix routine.
"""

from __future__ import annotations

import math

import torch


def positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def in_unit_interval(name: str, value: float, *, closed_right: bool = False) -> float:
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not ok:
        bracket = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be in {bracket}, got {value!r}")
    return float(value)


def as_rows(name: str, x: torch.Tensor, length: int) -> tuple[torch.Tensor, bool]:
    """Return ``x`` as a 2-D ``[k, length]`` batch and whether it was a single vector.

    Raises a ``ValueError`` naming ``name`` with the expected and the received length, and
    rejects NaN or Inf entries before any state is touched.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    single = x.dim() == 1
    if x.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [{length}] or [k, {length}], got {list(x.shape)}")
    rows = x.unsqueeze(0) if single else x
    if rows.shape[-1] != length:
        raise ValueError(
            f"{name} has length {rows.shape[-1]}, expected {length} (the estimator's num_params)"
        )
    if not torch.isfinite(rows).all():
        bad = (~torch.isfinite(rows)).sum().item()
        raise ValueError(
            f"{name} contains {bad} NaN or Inf entries; it was rejected and the estimator is unchanged"
        )
    return rows, single


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def fits(what: str, nbytes: int, device: torch.device, hint: str) -> None:
    """Raise ``MemoryError`` naming ``what`` and ``hint`` when ``nbytes`` exceed free memory."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise MemoryError(
            f"{what} would take {nbytes / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB "
            f"free; {hint}"
        )
