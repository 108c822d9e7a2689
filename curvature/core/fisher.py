r"""Inverse of the damped, block-diagonal empirical Fisher.

The matrix is

.. math::  F = \lambda I + \frac{1}{m} \sum_{i=1}^{m} g_i g_i^\top

restricted to diagonal blocks of ``block_size`` consecutive entries (``None``: one dense block).
When ``num_params`` is not a multiple of the block size the last block is shorter; internally it is
padded with coordinates whose gradient is always zero, which keeps them decoupled from the real ones,
so the padding is exact and never visible to the caller.

Two algorithms share one interface (:class:`FisherInverse`):

``"woodbury"`` (oBERT / WoodFisher)
    keeps every block inverse explicitly, ``[n_blocks, B, B]``, and applies the gradients by the
    rank-k Woodbury identity ``F^-1 <- F^-1 - U (m I_k + G U)^-1 U^T`` with ``U = F^-1 G^T``, which reads
    each block once per batch of ``k`` gradients. Memory ``O(d B)``.
``"mfac"`` (M-FAC, static)
    never forms a block: with ``G~ = G / sqrt(m)`` and the Cholesky factor ``L`` of
    ``K = lambda I + G~ G~^T`` (per block), ``F^-1 = (I - W^T W) / lambda`` with ``W = L^-1 G~``.
    ``W`` is built row by row as gradients arrive, which is exactly the M-FAC recursion
    ``v_i = F_{i-1}^-1 g_i`` written in Cholesky form (row ``i`` of ``W`` is ``v_i`` scaled by
    ``sqrt(lambda / denom_i)``). Memory ``O(d m)``, set-up ``O(d m^2)``, ``mul`` ``O(d m)`` and
    ``O(m)`` per diagonal entry.

Precision policy: all small matrices (``m x m``, ``k x k``) and every update are computed in
float64. The large buffers (block inverses, ``W``) are stored in ``dtype``, float64 by default.
float32 storage halves the memory and keeps a relative error of about ``1e-7 * cond`` per entry;
it is the caller's explicit choice. Plain float32 *computation* of these recursions is known to give
relative errors above 1 at gradient norm 1 and damping 1e-5, which is why it is never used.

References:
    Kurtic et al., "The Optimal BERT Surgeon", EMNLP 2022.
    Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021.

Example:
    >>> import torch
    >>> from curvature import FisherInverse
    >>> finv = FisherInverse(10, gradients=4, damping=1e-3, block_size=4)
    >>> finv.add_grad(torch.randn(4, 10))
    >>> finv.mul(torch.ones(10)).shape
    torch.Size([10])
"""

from __future__ import annotations

import math

import torch

from curvature import kernels
from curvature.core import checks as _checks

ALGORITHMS = ("auto", "woodbury", "mfac")
# Everything except the large stored buffers is computed in this dtype (see the module docstring).
COMPUTE_DTYPE = torch.float64
# Blocks processed per chunk in the Woodbury update: bounds the float64 temporaries.


#: float64 elements of ``W`` widened at once by a product with narrower storage (2 MiB)
WIDEN_CHUNK = 1 << 18


def choose_algorithm(num_params: int, gradients: int, block_size: int | None) -> str:
    """The algorithm that stores less: Woodbury blocks take ``d*B``, M-FAC rows take ``d*m``."""
    block = num_params if block_size is None else min(block_size, num_params)
    return "woodbury" if block <= gradients else "mfac"


def woodbury_update(blocks: torch.Tensor, grads: torch.Tensor, gradients: int) -> None:
    """Apply ``k`` gradients to block inverses in place (rank-k Woodbury).

    Args:
        blocks: ``[n, B, B]`` block inverses.
        grads: ``[k, n, B]`` gradients split into the same blocks.
        gradients: the ``m`` of ``F = damping I + (1/m) sum g g^T``.

    Runs through :func:`curvature.kernels.woodbury_update`: the fused Triton kernel for CUDA
    tensors, the float64 rank-k torch form otherwise.
    """
    kernels.woodbury_update(blocks, grads, gradients)


class FisherInverse:
    """Damped block-diagonal empirical-Fisher inverse: ``add_grad``, ``mul``, ``diag``.

    Args:
        num_params: ``d``, the length of a gradient.
        gradients: ``m``, the number of gradients the Fisher averages (the normaliser ``1/m``).
            Adding more than ``m`` gradients is an error.
        damping: ``lambda > 0``, the damping added to the diagonal.
        block_size: ``B``; ``None`` means one dense ``d x d`` block. ``d`` need not be divisible.
        algorithm: ``"woodbury"``, ``"mfac"`` or ``"auto"`` (the one that stores less).
        device: where the buffers live.
        dtype: storage dtype of the large buffers (default float64; see the precision policy).
    """

    def __init__(
        self,
        num_params: int,
        *,
        gradients: int,
        damping: float,
        block_size: int | None = None,
        algorithm: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.num_params = _checks.positive_int("num_params", num_params)
        self.gradients = _checks.positive_int("gradients", gradients)
        self.damping = _checks.positive("damping", damping)
        if block_size is not None:
            _checks.positive_int("block_size", block_size)
        _checks.one_of("algorithm", algorithm, ALGORITHMS)
        if algorithm == "auto":
            algorithm = choose_algorithm(num_params, gradients, block_size)
        self.algorithm = algorithm
        self.block_size = num_params if block_size is None else min(block_size, num_params)
        self.num_blocks = math.ceil(num_params / self.block_size)
        self.dtype = dtype or torch.float64
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_seen = 0  # gradients added so far
        n, b = self.num_blocks, self.block_size
        if algorithm == "woodbury":
            # blocks[i] = inverse of block i; starts at I / damping.
            eye = torch.eye(b, dtype=self.dtype, device=self.device) / self.damping
            self._blocks = eye.repeat(n, 1, 1)  # [n, B, B], dtype
        else:
            # Rows of W = L^-1 G~ per block. The factor L itself is never needed again: the next
            # rows of L come from G~_new W^T, so W is the whole state.
            self._w = torch.empty(0, n, b, dtype=self.dtype, device=self.device)  # [i, n, B]

    # ------------------------------------------------------------------ helpers
    @property
    def _padded(self) -> int:
        return self.num_blocks * self.block_size

    def _split(self, rows: torch.Tensor) -> torch.Tensor:
        """``[k, d]`` -> ``[k, n, B]`` with zero padding."""
        pad = self._padded - self.num_params
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        return rows.reshape(rows.shape[0], self.num_blocks, self.block_size)

    @staticmethod
    def estimate_bytes(
        num_params: int,
        *,
        gradients: int,
        block_size: int | None,
        algorithm: str = "auto",
        dtype: torch.dtype = torch.float64,
    ) -> int:
        """Bytes the stored buffers of such an estimator take (before allocating them)."""
        if algorithm == "auto":
            algorithm = choose_algorithm(num_params, gradients, block_size)
        b = num_params if block_size is None else min(block_size, num_params)
        padded = math.ceil(num_params / b) * b
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if algorithm == "woodbury":
            return padded * b * itemsize
        return padded * gradients * itemsize

    # ------------------------------------------------------------------ public API
    def add_grad(self, g: torch.Tensor) -> None:
        """Add one gradient ``[d]`` or a batch ``[k, d]``.

        Raises ``ValueError`` (leaving the estimator unchanged) on a wrong length, NaN/Inf entries,
        or more than ``gradients`` gradients in total.
        """
        rows, _ = _checks.as_rows("g", g, self.num_params)
        k = rows.shape[0]
        if self.num_seen + k > self.gradients:
            raise ValueError(
                f"adding {k} gradient(s) would make {self.num_seen + k}, more than "
                f"gradients={self.gradients}; create the estimator with a larger gradients"
            )
        split = self._split(rows.to(device=self.device))
        if self.algorithm == "woodbury":
            woodbury_update(self._blocks, split, self.gradients)
        else:
            self._mfac_append(split)
        self.num_seen += k

    def _mfac_append(self, split: torch.Tensor) -> None:
        # Grow the per-block Cholesky factor of K = damping I + G~ G~^T by k rows:
        # L21 = G~_new W_old^T, L22 = chol(damping I + G~_new G~_new^T - L21 L21^T),
        # W_new = L22^-1 (G~_new - L21 W_old). All per block, computed in float64.
        g = split.to(COMPUTE_DTYPE).permute(1, 0, 2) / math.sqrt(self.gradients)  # [n, k, B]
        k = g.shape[1]
        w_old = self._w.to(COMPUTE_DTYPE).permute(1, 0, 2)  # [n, i, B]
        l21 = g @ w_old.transpose(1, 2)  # [n, k, i]
        eye = torch.eye(k, dtype=COMPUTE_DTYPE, device=self.device) * self.damping
        s = eye + g @ g.transpose(1, 2) - l21 @ l21.transpose(1, 2)
        l22 = torch.linalg.cholesky(s)
        w_new = torch.linalg.solve_triangular(l22, g - l21 @ w_old, upper=False)  # [n, k, B]
        self._w = torch.cat([self._w, w_new.permute(1, 0, 2).to(self.dtype)], dim=0)

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """``F^-1 x`` for ``x`` of shape ``[d]`` or ``[k, d]``; result in ``x``'s dtype."""
        rows, single = _checks.as_rows("x", x, self.num_params)
        xs = self._split(rows.to(device=self.device, dtype=COMPUTE_DTYPE))  # [k, n, B]
        if self.algorithm == "woodbury":
            out = torch.einsum("nab,knb->kna", self._blocks.to(COMPUTE_DTYPE), xs)
        elif self._w.dtype == COMPUTE_DTYPE:
            w = self._w  # [i, n, B]
            coef = torch.einsum("inb,knb->kni", w, xs)
            out = (xs - torch.einsum("kni,inb->knb", coef, w)) / self.damping
        else:
            out = self._mfac_mul_widened(xs)
        out = out.reshape(rows.shape[0], -1)[:, : self.num_params].to(x.dtype)
        return out[0] if single else out

    def _mfac_mul_widened(self, xs: torch.Tensor) -> torch.Tensor:
        """``F^-1 x`` from ``W`` stored in a narrower dtype, computed in float64 a slice of ``W``
        at a time: each slice is widened while it is in cache instead of the whole ``W`` being
        copied to float64 on every call (which made float32 storage slower than float64)."""
        w_all = self._w  # [i, n, B]
        rows, n, b = w_all.shape
        k = xs.shape[0]
        out = torch.empty_like(xs)
        cols = max(1, WIDEN_CHUNK // max(rows, 1))  # columns of W widened at once
        if b <= cols:  # whole blocks per slice: one pass
            per = max(1, cols // b)
            for a in range(0, n, per):
                w = w_all[:, a : a + per].to(COMPUTE_DTYPE)
                x = xs[:, a : a + per]
                coef = torch.einsum("inb,knb->kni", w, x)
                out[:, a : a + per] = (x - torch.einsum("kni,inb->knb", coef, w)) / self.damping
            return out
        for blk in range(n):  # a block wider than a slice: its coefficients first, then out
            coef = torch.zeros(k, rows, dtype=COMPUTE_DTYPE, device=self.device)
            for a in range(0, b, cols):
                w = w_all[:, blk, a : a + cols].to(COMPUTE_DTYPE)
                coef += xs[:, blk, a : a + cols] @ w.T
            for a in range(0, b, cols):
                w = w_all[:, blk, a : a + cols].to(COMPUTE_DTYPE)
                out[:, blk, a : a + cols] = (xs[:, blk, a : a + cols] - coef @ w) / self.damping
        return out

    def diag(self) -> torch.Tensor:
        """``diag(F^-1)`` as a ``[d]`` tensor in the storage dtype."""
        if self.algorithm == "woodbury":
            d = torch.diagonal(self._blocks, dim1=1, dim2=2)
        else:
            w = self._w.to(COMPUTE_DTYPE)
            d = ((1.0 - (w * w).sum(0)) / self.damping).to(self.dtype)
        return d.reshape(-1)[: self.num_params]

    def blocks(self, sl: slice | None = None) -> torch.Tensor:
        """The block inverses ``[n_blocks, B, B]`` (padded coordinates carry ``1/damping``), or only
        the blocks ``sl``.

        Materialised from ``W`` for ``"mfac"`` (``O(d B)`` memory for all blocks, so read them a
        slice at a time), stored for ``"woodbury"``.
        """
        sl = slice(None) if sl is None else sl
        if self.algorithm == "woodbury":
            return self._blocks[sl]
        w = self._w[:, sl].to(COMPUTE_DTYPE).permute(1, 0, 2)  # [n, i, B]
        eye = torch.eye(self.block_size, dtype=COMPUTE_DTYPE, device=self.device)
        return ((eye - w.transpose(1, 2) @ w) / self.damping).to(self.dtype)
