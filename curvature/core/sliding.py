r"""Sliding-window damped-Fisher inverse (the structure of the M-FAC optimizer).

Keeps a ring buffer ``G`` of the last ``window`` gradients and their Gram matrix ``G G^T``. With
``c = min(seen, window)`` gradients in the buffer and the divisor ``s``,

.. math::  F = \lambda I + \frac{1}{s} G^\top G, \qquad
           F^{-1} x = \frac{1}{\lambda}\Big(x - G^\top (s\lambda I + G G^\top)^{-1} G x\Big).

``normalizer="window"`` divides by ``s = window`` from the first step, as if the buffer started
full of zero gradients (the M-FAC reference); ``"seen"`` divides by ``s = c``, which keeps the
Fisher's scale during warm-up. The two agree once ``window`` gradients have been added. The ``c x c`` system is solved through a Cholesky factor refreshed on every
``add_grad`` (``O(d m + m^3)``); a product costs ``O(d m + m^2)``. The reference code uses an LU
without pivoting that PyTorch implements only on CUDA; the Cholesky form is mathematically the same
and runs on any device. The order of rows in the ring buffer does not matter.

Precision: the Gram matrix and its factor are float64; the gradient buffer is stored in ``dtype``
(float32 by default: it is the ``O(d m)`` memory, and the products with it are accumulated in float64).

References:
    Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021.

Example:
    >>> import torch
    >>> from curvature import SlidingWindowFisherInverse
    >>> finv = SlidingWindowFisherInverse(6, window=3, damp=1e-2)
    >>> for _ in range(5):
    ...     finv.add_grad(torch.randn(6))
    >>> finv.mul(torch.ones(6)).shape
    torch.Size([6])
"""

from __future__ import annotations

import torch

from curvature.core import checks as _checks

COMPUTE_DTYPE = torch.float64


class SlidingWindowFisherInverse:
    """``F^-1`` over the last ``window`` gradients; ``add_grad`` / ``mul`` like :class:`FisherInverse`.

    Args:
        num_params: ``d``.
        window: ``m``, how many of the most recent gradients the Fisher averages.
        damp: ``lambda > 0``.
        device: where the buffers live.
        dtype: storage dtype of the ``[m, d]`` gradient ring buffer (default float32).
        normalizer: ``"seen"`` (divide by the gradients added so far, up to ``window``) or
            ``"window"`` (always divide by ``window``).
    """

    def __init__(
        self,
        num_params: int,
        *,
        window: int,
        damp: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        normalizer: str = "seen",
    ) -> None:
        self.normalizer = _checks.one_of("normalizer", normalizer, ("seen", "window"))
        self.num_params = _checks.positive_int("num_params", num_params)
        self.window = _checks.positive_int("window", window)
        self.damp = _checks.positive("damp", damp)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        _checks.fits(
            f"the gradient window ({window} x {num_params:,})",
            window * num_params * itemsize,
            self.device,
            "lower num_grads (the window) or store it in a smaller dtype",
        )
        # State (all of it):
        self.grads = torch.zeros(window, num_params, dtype=self.dtype, device=self.device)  # ring
        self.gram = torch.zeros(window, window, dtype=COMPUTE_DTYPE, device=self.device)  # G G^T
        self.num_seen = 0  # gradients added since creation
        self._chol: torch.Tensor | None = None  # Cholesky factor of c*damp*I + G G^T (c x c)

    @property
    def count(self) -> int:
        """How many gradients the Fisher currently averages: ``min(seen, window)``."""
        return min(self.num_seen, self.window)

    def add_grad(self, g: torch.Tensor) -> None:
        """Push one gradient ``[d]`` (or ``[k, d]``, pushed in order), evicting the oldest."""
        rows, _ = _checks.as_rows("g", g, self.num_params)
        for row in rows.to(device=self.device):
            slot = self.num_seen % self.window
            self.grads[slot] = row.to(self.dtype)
            dots = torch.zeros(self.window, dtype=COMPUTE_DTYPE, device=self.device)
            for cols in self._column_chunks():  # float64 a chunk at a time, not the whole window
                dots += self.grads[:, cols].to(COMPUTE_DTYPE) @ self.grads[slot, cols].to(
                    COMPUTE_DTYPE
                )
            self.gram[slot, :] = dots
            self.gram[:, slot] = dots
            self.num_seen += 1
        self.refactor()

    def _column_chunks(self):
        """Column slices covering ``d`` with about ``2**22`` window elements each."""
        step = max(1, (1 << 22) // self.window)
        return [slice(i, min(self.num_params, i + step)) for i in range(0, self.num_params, step)]

    def refactor(self) -> None:
        """Refresh the Cholesky factor of ``c damp I + G G^T`` from the stored Gram matrix."""
        c = self.count
        if c == 0:
            self._chol = None
            return
        eye = torch.eye(c, dtype=COMPUTE_DTYPE, device=self.device)
        scale = self.window if self.normalizer == "window" else c
        self._chol = torch.linalg.cholesky(self.gram[:c, :c] + scale * self.damp * eye)

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """``F^-1 x`` for ``x`` of shape ``[d]`` or ``[k, d]``; result in ``x``'s dtype."""
        rows, single = _checks.as_rows("x", x, self.num_params)
        xs = rows.to(device=self.device, dtype=COMPUTE_DTYPE)
        if self._chol is None:
            out = xs / self.damp
        else:
            c = self.count
            gx = torch.zeros(c, xs.shape[0], dtype=COMPUTE_DTYPE, device=self.device)
            for cols in self._column_chunks():
                gx += self.grads[:c, cols].to(COMPUTE_DTYPE) @ xs[:, cols].T
            coef = torch.cholesky_solve(gx, self._chol)  # [c, k]
            out = xs.clone()
            for cols in self._column_chunks():
                out[:, cols] -= (self.grads[:c, cols].to(COMPUTE_DTYPE).T @ coef).T
            out /= self.damp
        out = out.to(x.dtype)
        return out[0] if single else out
