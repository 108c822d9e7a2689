r"""Sliding-window damped-Fisher inverse (the structure of the M-FAC optimizer).

Keeps a ring buffer ``G`` of the last ``window`` gradients and their Gram matrix ``G G^T``. With
``c = min(seen, window)`` gradients in the buffer and the divisor ``s``,

.. math::  F = \lambda I + \frac{1}{s} G^\top G, \qquad
           F^{-1} x = \frac{1}{\lambda}\Big(x - G^\top (s\lambda I + G G^\top)^{-1} G x\Big).

``normalizer="window"`` divides by ``s = window`` from the first step, as if the buffer started
full of zero gradients (the M-FAC reference); ``"seen"`` divides by ``s = c``, which keeps the
Fisher's scale during warm-up. The two agree once ``window`` gradients have been added. The order
of rows in the ring buffer does not matter.

Cost per step: a product is two passes over the ``[m, d]`` window (``G x``, then ``x - G^T c``),
and :meth:`add_and_mul` (the optimizer's step: push ``g``, return ``F^-1 g``) also takes two,
because the new Gram row is ``G g``. The ``m x m`` system is kept as an explicit inverse
``B = (s damping I + G G^T)^-1`` that a new gradient changes by a symmetric rank-2 term (its row and
column of the Gram matrix), applied by a Woodbury update in ``O(m^2)`` instead of an ``O(m^3)``
factorisation. After each update the changed column of ``A B - I`` is checked; when it exceeds
``1e-6`` (nearly rank-deficient windows with a small ``damping``, where the update loses digits),
and every ``refresh_every`` updates, ``B`` is recomputed from a Cholesky factor of the Gram
matrix. Products solve with ``B`` and two steps of iterative refinement against ``A`` itself, so
they keep the accuracy of a direct Cholesky solve (``tests/core/test_sliding_kronecker.py``). The
reference code refactors an LU without pivoting every step, which PyTorch implements only on
CUDA.

Precision: the Gram matrix, ``B`` and every ``m x m`` step are float64. The ``O(d m)`` products
run in the storage dtype (float32 by default, as in the reference; float32 for 16-bit storage),
with ``G x`` summed over column chunks of about ``2**22`` window elements in float64; float64
storage makes every step float64. The float32 Gram entries carry a round-off of about
``1e-7 |g|^2``: when that is not small against ``s * damping`` (a tiny ``damping`` with large, nearly
parallel gradients) the float32 answer is as poor as the reference's float32 one, and round-off
can even make ``s damping I + G G^T`` indefinite; the Gram matrix is then projected back to
semi-definite (counted in ``projections``) so that the step never fails. Use float64 storage
there.

References:
    Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021.

Example:
    >>> import torch
    >>> from curvature import SlidingWindowFisherInverse
    >>> finv = SlidingWindowFisherInverse(6, window=3, damping=1e-2)
    >>> for _ in range(5):
    ...     finv.add_grad(torch.randn(6))
    >>> finv.mul(torch.ones(6)).shape
    torch.Size([6])
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from curvature.core import checks as _checks
from curvature.core.parallel import world

COMPUTE_DTYPE = torch.float64
REFINE_STEPS = 2  # iterative-refinement steps of every product against A itself
DRIFT_TOL = 1e-6  # largest entry of (A B - I) e_k tolerated after an incremental update


class SlidingWindowFisherInverse:
    """``F^-1`` over the last ``window`` gradients; ``add_grad`` / ``mul`` like :class:`FisherInverse`.

    Args:
        num_params: ``d``.
        window: ``m``, how many of the most recent gradients the Fisher averages.
        damping: ``lambda > 0``.
        device: where the buffers live.
        dtype: storage dtype of the ``[m, d]`` gradient ring buffer (default float32).
        normalizer: ``"seen"`` (divide by the gradients added so far, up to ``window``) or
            ``"window"`` (always divide by ``window``).
        refresh_every: recompute the ``m x m`` inverse from the Gram matrix after this many
            incremental updates (bounds the round-off the updates accumulate).
        shard: ``True`` to split the window by coordinates across the ranks of the initialised
            ``torch.distributed`` process group: rank ``r`` stores the columns of its contiguous
            ``d / W`` slice, ``G x`` is the all-reduced sum of the slices' products (``m`` numbers
            per vector), the ``m x m`` algebra is replicated, and results are all-gathered, so
            every rank returns the full ``F^-1 x``. Window memory per rank is ``1/W``.
    """

    def __init__(
        self,
        num_params: int,
        *,
        window: int,
        damping: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        normalizer: str = "seen",
        refresh_every: int = 64,
        shard: bool = False,
    ) -> None:
        self.normalizer = _checks.one_of("normalizer", normalizer, ("seen", "window"))
        self.num_params = _checks.positive_int("num_params", num_params)
        self.window = _checks.positive_int("window", window)
        self.damping = _checks.positive("damping", damping)
        self.refresh_every = _checks.positive_int("refresh_every", refresh_every)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        # the dtype of the O(d m) products: the storage's own, float32 for 16-bit storage
        self._work = torch.float64 if self.dtype == torch.float64 else torch.float32
        rank, self._world = world() if shard else (0, 1)
        bounds = [num_params * r // self._world for r in range(self._world + 1)]
        self._bounds = bounds
        self._lo, self._hi = bounds[rank], bounds[rank + 1]  # this rank's columns
        width = self._hi - self._lo
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        _checks.fits(
            f"the gradient window ({window} x {width:,})",
            window * width * itemsize,
            self.device,
            "lower gradients (the window) or store it in a smaller dtype",
        )
        # State (all of it):
        self.grads = torch.zeros(window, width, dtype=self.dtype, device=self.device)  # ring
        self.gram = torch.zeros(window, window, dtype=COMPUTE_DTYPE, device=self.device)  # G G^T
        self.num_seen = 0  # gradients added since creation
        # (s damping I + G G^T)^-1 over all m slots (rows not yet written are zero), and the number
        # of incremental updates since it was last recomputed
        self._inv: torch.Tensor | None = None
        self._inv_scale = 0
        self._since_refresh = 0
        self.refactors = 0  # full O(m^3) factorisations so far (the rest were O(m^2) updates)
        self.projections = 0  # Gram matrices projected back to semi-definite (round-off)

    @property
    def count(self) -> int:
        """How many gradients the Fisher currently averages: ``min(seen, window)``."""
        return min(self.num_seen, self.window)

    def _scale(self) -> int:
        return self.window if self.normalizer == "window" else self.count

    def add_grad(self, g: torch.Tensor) -> None:
        """Push one gradient ``[d]`` (or ``[k, d]``, pushed in order), evicting the oldest."""
        rows, _ = _checks.as_rows("g", g, self.num_params)
        for row in rows.to(device=self.device):
            self._push(row[self._lo : self._hi])

    def add_and_mul(self, g: torch.Tensor) -> torch.Tensor:
        """Push the gradient ``g`` ``[d]`` and return ``F^-1 g`` with the updated window.

        The same as ``add_grad(g); mul(g)`` with one pass over the window fewer: the new row of
        the Gram matrix is also ``G g``.
        """
        rows, _ = _checks.as_rows("g", g, self.num_params)
        if rows.shape[0] != 1:
            raise ValueError(f"g must have shape [{self.num_params}], got {list(g.shape)}")
        row = rows[0].to(device=self.device)
        gx = self._push(row[self._lo : self._hi]).unsqueeze(1)
        # precondition the stored row: with 16-bit storage G g is a product with the rounded g,
        # and the rounding error would otherwise pass through 1 / damping
        stored = self.grads[(self.num_seen - 1) % self.window].unsqueeze(0)
        return self._gather(self._apply(stored, gx))[0].to(g.dtype)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """``[k, d]`` from every rank's ``[k, d / W]`` columns (the rows themselves unsharded)."""
        if self._world == 1:
            return local
        b = self._bounds
        widest = max(b[r + 1] - b[r] for r in range(self._world))
        pad = torch.zeros(local.shape[0], widest, dtype=local.dtype, device=local.device)
        pad[:, : local.shape[1]] = local
        parts = [torch.empty_like(pad) for _ in range(self._world)]
        dist.all_gather(parts, pad)
        return torch.cat([p[:, : b[r + 1] - b[r]] for r, p in enumerate(parts)], dim=1)

    def _push(self, row: torch.Tensor) -> torch.Tensor:
        """Write ``row`` (this rank's columns) over the oldest slot, update the Gram matrix and the inverse; return the
        new Gram row ``G row`` (float64)."""
        slot = self.num_seen % self.window
        self.grads[slot] = row.to(self.dtype)
        dots = self._gx(self.grads[slot].unsqueeze(0))[:, 0]
        old = self.gram[slot].clone()
        self.gram[slot, :] = dots
        self.gram[:, slot] = dots
        self.num_seen += 1
        if (
            self._inv is None
            or self._inv_scale != self._scale()
            or self._since_refresh >= self.refresh_every
        ):
            self.refactor()
        else:
            self._replace_row(slot, dots - old)
        return dots

    def _replace_row(self, k: int, delta: torch.Tensor) -> None:
        """Woodbury update of the inverse for a change ``delta`` of row and column ``k``.

        The change is ``e_k w^T + w e_k^T`` with ``w = delta - delta_k e_k / 2``: a symmetric
        rank-2 term, so the update costs ``O(m^2)`` instead of a new ``O(m^3)`` factorisation.
        """
        b = self._inv
        w = delta.clone()
        w[k] -= 0.5 * delta[k]
        bu = torch.stack([b[:, k], b @ w], dim=1)  # B [e_k, w]
        bv = bu.flip(1)  # B [w, e_k]
        u = torch.zeros(b.shape[0], 2, dtype=COMPUTE_DTYPE, device=self.device)
        u[k, 0] = 1.0
        u[:, 1] = w
        cap = torch.eye(2, dtype=COMPUTE_DTYPE, device=self.device) + bv.T @ u  # I + V^T B U
        # det(cap) = det(A') / det(A): not positive when round-off left A' indefinite
        sol, info = torch.linalg.solve_ex(cap, bv.T)
        if info.item() != 0 or torch.linalg.det(cap).item() <= 0 or not torch.isfinite(sol).all():
            self.refactor()
            return
        b = b - bu @ sol
        self._inv = 0.5 * (b + b.T)
        self._since_refresh += 1
        # drift check on the changed column: (A B - I) e_k, O(m^2)
        resid = self._matrix() @ self._inv[:, k]
        resid[k] -= 1.0
        if not bool(torch.isfinite(resid).all()) or resid.abs().max().item() > DRIFT_TOL:
            self.refactor()

    def _chunks(self):
        """Column slices covering this rank's columns with about ``2**22`` window elements each."""
        width = self.grads.shape[1]
        step = max(1, (1 << 22) // self.window)
        return [slice(i, min(width, i + step)) for i in range(0, width, step)]

    def _gx(self, xs: torch.Tensor) -> torch.Tensor:
        """``G x`` for rows ``xs`` ``[k, d / W]`` (this rank's columns) as ``[m, k]`` float64: each
        column chunk's product in the working dtype, the chunks (and the ranks) summed in
        float64."""
        xs = xs.to(self._work)
        out = torch.zeros(self.window, xs.shape[0], dtype=COMPUTE_DTYPE, device=self.device)
        for cols in self._chunks():
            out += (self.grads[:, cols].to(self._work) @ xs[:, cols].T).to(COMPUTE_DTYPE)
        if self._world > 1:
            dist.all_reduce(out)
        return out

    def _apply(self, xs: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
        """``(x - G^T B G x) / damping`` from ``gx = G x``."""
        a = self._matrix()
        coef = self._inv @ gx
        for _ in range(REFINE_STEPS):  # iterative refinement against A itself
            coef = coef + self._inv @ (gx - a @ coef)
        coef = coef.T.to(self._work)  # [k, m]
        xs = xs.to(self._work)
        inv_damp = 1.0 / self.damping
        if self.grads.dtype == self._work:  # no reduction over d here: one product, no chunks
            return torch.addmm(xs, coef, self.grads, beta=inv_damp, alpha=-inv_damp)
        parts = [
            torch.addmm(
                xs[:, c], coef, self.grads[:, c].to(self._work), beta=inv_damp, alpha=-inv_damp
            )
            for c in self._chunks()
        ]
        # a rank that holds no columns (d smaller than the number of ranks) returns none
        return torch.cat(parts, dim=1) if parts else xs[:, :0].clone()

    def _matrix(self) -> torch.Tensor:
        """``s damping I + G G^T`` (``m x m``, float64) at the scale of the current inverse."""
        return self.gram + self._inv_scale * self.damping * torch.eye(
            self.window, dtype=COMPUTE_DTYPE, device=self.device
        )

    def refactor(self) -> None:
        """Recompute the ``m x m`` inverse ``(s damping I + G G^T)^-1`` from the stored Gram matrix.

        Gram rows of the float32 products carry round-off; if it makes ``s damping I + G G^T``
        indefinite (nearly parallel gradients of large norm with a tiny ``damping``), the Gram
        matrix is first projected back onto the positive semi-definite matrices (negative
        eigenvalues set to zero), as ``G G^T`` is in exact arithmetic.
        """
        scale = self._scale()
        if scale == 0:
            self._inv, self._inv_scale, self._since_refresh = None, scale, 0
            return
        eye = torch.eye(self.window, dtype=COMPUTE_DTYPE, device=self.device)
        chol, info = torch.linalg.cholesky_ex(self.gram + scale * self.damping * eye)
        if info.item() != 0:
            evals, evecs = torch.linalg.eigh(self.gram)
            self.gram.copy_((evecs * evals.clamp(min=0)) @ evecs.T)
            self.gram.copy_(0.5 * (self.gram + self.gram.T))
            chol = torch.linalg.cholesky(self.gram + scale * self.damping * eye)
            self.projections += 1
        self._inv = torch.cholesky_inverse(chol)
        self._inv_scale, self._since_refresh = scale, 0
        self.refactors += 1

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """``F^-1 x`` for ``x`` of shape ``[d]`` or ``[k, d]``; result in ``x``'s dtype."""
        rows, single = _checks.as_rows("x", x, self.num_params)
        rows = rows.to(device=self.device)
        if self._inv is None:
            out = rows.to(self._work) / self.damping
        else:
            local = rows[:, self._lo : self._hi]
            out = self._gather(self._apply(local, self._gx(local)))
        out = out.to(x.dtype)
        return out[0] if single else out
