r"""Second-order quantization on the layer Hessian: GPTQ, exact OBQ and round-to-nearest.

The weights of a linear layer are rounded to a uniform grid per output row (per channel) or per
group of ``group`` input columns of a row:

- grid: asymmetric by default, ``xmin = min(row min, 0)``, ``xmax = max(row max, 0)`` (zero is
  always on the grid; an all-zero row gets ``[-1, 1]``), ``scale = (xmax - xmin) / maxq`` with
  ``maxq = 2^bits - 1``, ``zero = round(-xmin / scale)``; symmetric: ``xmax = max(|xmin|, xmax)``,
  ``zero = (maxq + 1) / 2``. A weight becomes the code ``q = clamp(round(w / scale) + zero, 0,
  maxq)`` and is read back as ``scale * (q - zero)``. A zero weight stays exactly zero (``zero`` is an
  integer), so a pruned layer keeps its mask.
- :func:`gptq`: the column sweep of :func:`curvature.pruning.layer_obs.sparsegpt` with every kept
  weight rounded as its column is reached and the rounding error pushed onto the later columns
  through the upper Cholesky factor of ``H^-1`` (lazy batch updates over blocks of 128). Weights
  that are already zero (an earlier pruning) stay zero; with ``sparsity > 0`` or an ``N:M`` mask
  the same sweep prunes and rounds together (joint sparse + quantized). ``act_order``: columns in
  order of decreasing ``diag H``; ``static_groups``: the group grids fixed from the original
  weights before the sweep (otherwise each group's grid is fitted when the sweep reaches its first
  column, on the weights as corrected so far).
- :func:`obq`: exact Optimal Brain Quantization per row (the test reference): each step quantizes
  the weight whose rounding costs least, ``(w_j - q_j)^2 / [H_F^-1]_jj``, and corrects the others
  exactly; O(cols^3) per row.
- :func:`rtn`: round-to-nearest on the same grid, no correction (the baseline).

Deliberate deviation from the reference implementation, switchable: with groups narrower than
the 128-column block, the reference fits a group's grid on the block's weights as they were when
the block started (the corrections from the block's earlier columns are not yet written back);
here the grid is fitted on the current weights (``block_start_groups=True`` gives the reference's
choice). With ``group`` equal to the block (128) both are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curvature.core import checks

F64 = torch.float64
BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Grid:
    """A quantization grid: ``bits`` per weight, one scale and zero point per row (``group=None``)
    or per ``group`` input columns of a row, ``symmetric`` or not."""

    bits: int = 4
    group: int | None = 128
    symmetric: bool = False

    def __post_init__(self):
        checks.one_of("bits", self.bits, BITS)
        if self.group is not None:
            checks.positive_int("group", self.group)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def check_layer(self, cols: int, name: str) -> None:
        if self.group is not None and self.group > cols:
            raise ValueError(
                f"group {self.group} is larger than the {cols} input columns of {name}; use a "
                "smaller group or per-channel (group none)"
            )

    def fit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` per row of ``x`` (``[rows, n]``)."""
        zero_t = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        xmin = torch.minimum(x.min(1).values, zero_t)
        xmax = torch.maximum(x.max(1).values, zero_t)
        if self.symmetric:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / self.maxq
        if self.symmetric:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
        return scale, zero

    def codes(self, x, scale, zero) -> torch.Tensor:
        """Integer codes of ``x`` (``[rows]`` or ``[rows, n]``) on the grid ``scale``, ``zero``."""
        if x.dim() == 2 and scale.dim() == 1:  # one grid per row
            scale, zero = scale[:, None], zero[:, None]
        return torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)

    def round(self, x, scale, zero) -> torch.Tensor:
        if x.dim() == 2 and scale.dim() == 1:
            scale, zero = scale[:, None], zero[:, None]
        return scale * (self.codes(x, scale, zero) - zero)


@dataclass
class Quantized:
    """A quantized layer: the dequantized weights (in the sweep's precision, float64 by default),
    the integer codes, per-group scales and
    zero points (``[rows, groups]``), the group of each input column (``g_idx``, ``[cols]``) and the
    estimated error."""

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    estimate: float
    mask: torch.Tensor | None = None


class Rounder:
    """Rounds the columns of one layer's sweep on a :class:`Grid`, fitting each group's grid when
    the sweep reaches the group's first column (or once, before the sweep, with static groups).

    ``order``: the sweep's column order (original indices). Records the grid of every column."""

    def __init__(self, grid: Grid, w: torch.Tensor, order: torch.Tensor, static: bool, stale: bool):
        self.grid, self.static, self.stale = grid, static, stale
        rows, cols = w.shape
        self.order = order
        self.scale = torch.empty(rows, cols, dtype=w.dtype, device=w.device)  # per swept column
        self.zero = torch.empty_like(self.scale)
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.g_of = torch.empty(cols, dtype=torch.long)
        g = grid.group
        if g is None:  # per channel, from the whole row before the sweep
            self.groups = [grid.fit(w)]
            self.g_of[:] = 0
        elif static:  # groups of the original columns, fitted before the sweep
            for start in range(0, cols, g):
                self.groups.append(grid.fit(w[:, start : start + g]))
            self.g_of = order // g  # swept column k belongs to the group of original order[k]
        self._current = self.groups[0] if self.groups else None

    def fit_at(
        self, k: int, block_now: torch.Tensor, block_start: torch.Tensor, offset: int
    ) -> None:
        """Before rounding swept column ``k`` (``offset``: the block's first swept column)."""
        g = self.grid.group
        if g is None:
            return
        if self.static:
            self._current = self.groups[int(self.g_of[k])]
            return
        if k % g == 0:
            src = block_start if self.stale else block_now
            self._current = self.grid.fit(src[:, k - offset : k - offset + g])
            self.groups.append(self._current)
        self.g_of[k] = len(self.groups) - 1

    def round(self, k: int, col: torch.Tensor) -> torch.Tensor:
        scale, zero = self._current
        self.scale[:, k], self.zero[:, k] = scale, zero
        return self.grid.round(col, scale, zero)


def _permuted(w, h, fixed, perm):
    return w[:, perm], h[perm][:, perm], (fixed[:, perm] if fixed is not None else None)


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    *,
    rel_damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    fixed: torch.Tensor | None = None,
    block_start_groups: bool = False,
    name: str = "layer",
    dtype: torch.dtype = F64,
) -> Quantized:
    """GPTQ (and, with ``sparsity``/``nm``, the joint prune-and-quantize sweep) of ``w``
    (``[rows, cols]``) on ``h`` (``2/N X^T X``). Returns a :class:`Quantized` in the original column
    order."""
    from curvature.pruning import layer_obs

    rows, cols = w.shape
    grid.check_layer(cols, name)
    if act_order and (sparsity or nm is not None):
        raise ValueError(
            "act_order reorders columns; it cannot be combined with pruning in one sweep"
        )
    raw = w.to(dtype)
    w, h = layer_obs.prepare(w, h, dtype)  # dead inputs: weight 0 (as the reference), diagonal 1
    if fixed is None and bool((w == 0).any()):  # zeros already there stay zero
        fixed = w == 0
    order = torch.arange(cols, device=w.device)
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True)
    # per-channel grids from the rows as given (the reference fits them before dead inputs are
    # zeroed); static group grids from the original columns
    rounder = Rounder(
        grid, raw if grid.group is None else w, order.cpu(), static_groups, block_start_groups
    )
    if act_order:
        w, h, fixed = _permuted(w, h, fixed, order)
    # a group (and an N:M run) never straddles two blocks: a group's grid is fitted in one
    unit = math.lcm(grid.group or 1, nm[1] if nm is not None else 1)
    block = max(unit, block // unit * unit)
    new, mask, est = layer_obs.sparsegpt(
        w, h, sparsity, nm=nm, fixed=fixed, ratio=rel_damp, block=block, name=name, rounder=rounder,
        dtype=dtype,
    )  # fmt: skip
    inv = torch.argsort(order)
    codes = grid.codes(new, rounder.scale, rounder.zero)
    scales, zeros, g_idx = _group_tables(rounder, inv)
    out = Quantized(
        weight=new[:, inv], codes=codes[:, inv].to(torch.uint8), scales=scales, zeros=zeros,
        g_idx=g_idx, estimate=est, mask=mask[:, inv] if (sparsity or nm is not None) else None,
    )  # fmt: skip
    return out


def _group_tables(rounder: Rounder, inv: torch.Tensor):
    scales = torch.stack([s for s, _ in rounder.groups], dim=1)
    zeros = torch.stack([z for _, z in rounder.groups], dim=1)
    g_idx = (
        rounder.g_of[inv.cpu()]
        if rounder.grid.group is not None
        else torch.zeros(len(inv), dtype=torch.long)
    )
    return scales, zeros, g_idx


def rtn(w: torch.Tensor, grid: Grid, name: str = "layer") -> Quantized:
    """Round-to-nearest on the same grid (per channel, or per group of consecutive columns)."""
    w = w.to(F64)
    rows, cols = w.shape
    grid.check_layer(cols, name)
    g = grid.group or cols
    out, codes, scales, zeros = torch.empty_like(w), torch.empty_like(w), [], []
    for start in range(0, cols, g):
        part = w[:, start : start + g]
        scale, zero = grid.fit(part)
        codes[:, start : start + g] = grid.codes(part, scale, zero)
        out[:, start : start + g] = grid.round(part, scale, zero)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(cols) // g
    return Quantized(
        out, codes.to(torch.uint8), torch.stack(scales, 1), torch.stack(zeros, 1), g_idx, 0.0
    )


def obq(
    w: torch.Tensor, h: torch.Tensor, grid: Grid, *, rel_damp: float = 0.01, order=None
) -> torch.Tensor:
    """Exact OBQ per row on a per-channel grid fitted before quantization (the reference): each
    step quantizes one weight and corrects the others exactly with the downdated inverse; the
    weight whose rounding costs least (greedy), or the columns in ``order``."""
    from curvature.pruning import layer_obs

    if grid.group is not None:
        raise ValueError("obq: the reference takes a per-channel grid (group=None)")
    w, h = layer_obs.prepare(w, h)
    hinv, _ = layer_obs.damped_inverse(h, rel_damp)
    scale, zero = grid.fit(w)
    out = w.clone()
    for r in range(w.shape[0]):
        row, hi = w[r].clone(), hinv.clone()
        left = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        for step in range(w.shape[1]):
            q = grid.round(row, scale[r], zero[r])
            if order is not None:
                j = int(order[step])
            else:
                d = torch.diagonal(hi)
                cost = torch.where(left, (row - q) ** 2 / d, torch.full_like(d, float("inf")))
                j = int(torch.argmin(cost))
            err = (row[j] - q[j]) / hi[j, j]
            row -= err * hi[j]
            row[j] = q[j]
            left[j] = False
            hi -= torch.outer(hi[:, j], hi[j]) / hi[j, j]
        out[r] = row
    return out
