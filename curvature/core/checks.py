"""The one place where arguments are checked, for every layer of the toolkit.

The core estimators, the pruning engine (its validated settings object), the optimizers and the
recipe schema (inside its pydantic validators) all call these functions, so a rule and its message
exist once. Every check raises ``ValueError`` (``TypeError`` for a wrong kind of object) with a
message that names the argument, the value received and what is allowed, so that a user mistake
reads as a sentence and never as a deep traceback from a matrix routine.
"""

from __future__ import annotations

import difflib
import math

import psutil
import torch


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def nonnegative(name: str, value) -> float:
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def integer_at_least(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def learning_rate(value, name: str = "lr") -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def betas(value, name: str = "betas") -> tuple[float, float]:
    try:
        b1, b2 = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}") from None
    for i, b in enumerate((b1, b2)):
        if not _is_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"{name}[{i}] must be in [0, 1), got {b!r}")
    return float(b1), float(b2)


def in_range(name: str, value, low: float, high: float, bounds: str = "[)") -> float:
    """``value`` in the interval from ``low`` to ``high``; ``bounds`` is "[]", "[)", "(]" or "()"."""
    ok = _is_number(value) and (
        (low <= value if bounds[0] == "[" else low < value)
        and (value <= high if bounds[1] == "]" else value < high)
    )
    if not ok:
        raise ValueError(
            f"{name} must be in {bounds[0]}{low:g}, {high:g}{bounds[1]}, got {value!r}"
        )
    return float(value)


def one_of(name: str, value, allowed) -> object:
    """``value`` if it is in ``allowed``; else an error listing them and the nearest one."""
    allowed = tuple(allowed)
    if value in allowed:
        return value
    near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}{hint}")


def in_unit_interval(name: str, value: float, *, closed_right: bool = False) -> float:
    if not _is_number(value):
        bracket = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be in {bracket}, got {value!r}")
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


def available_bytes(device: torch.device | str) -> int | None:
    """Memory that can be allocated on ``device`` without swapping, ``None`` if unknown.

    The toolkit's one memory probe: CUDA's free device memory, or the operating system's
    *available* memory (free plus reclaimable caches) for the CPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return int(psutil.virtual_memory().available)
    return None


def fits(what: str, nbytes: int, device: torch.device, hint: str) -> None:
    """Raise ``MemoryError`` naming ``what`` and ``hint`` when ``nbytes`` exceed free memory."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise MemoryError(
            f"{what} would take {nbytes / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB "
            f"free; {hint}"
        )
