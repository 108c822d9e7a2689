r"""Inverse of an exponential moving average of rank-1 outer products (MKOR's factors).

.. math::  L_0 = \lambda I, \qquad L_t = \gamma L_{t-1} + (1 - \gamma)\, u_t u_t^\top

The inverse is kept by Sherman-Morrison, ``O(dim^2)`` per update and never a matrix inversion:

.. math::  A = L_{t-1}^{-1} / \gamma, \qquad
           L_t^{-1} = A - \frac{(1-\gamma)\, A u u^\top A}{1 + (1-\gamma)\, u^\top A u}.

``form="inverse"`` keeps instead the MKOR authors' code's rule, a moving average of the *inverse*
toward ``I`` followed by a rank-1 term of weight 1,

.. math::  P = \gamma L_{t-1}^{-1} + (1 - \gamma) I, \qquad
           L_t^{-1} = P - \frac{P u u^\top P}{1 + u^\top P u}
           \quad\big(L_t = P^{-1} + u u^\top\big),

whose inverse stays bounded (its eigenvalues never exceed ``max(1, 1/damping)``).

Precision: the inverse is stored in ``dtype`` (float64 by default) and each update is computed in
float64. Directions that ``u`` stops visiting decay like ``gamma^t``, so their inverse grows like
``gamma^-t``; MKOR's stabiliser (in the optimizer) is what bounds that, not this class.

References:
    Mozaffari, Li, Zhang, Mehri Dehnavi, "MKOR: Momentum-Enabled Kronecker-Factor-Based Optimizer
    Using Rank-1 Updates", NeurIPS 2023.

Example:
    >>> import torch
    >>> from curvature import KroneckerFactorInverse
    >>> k = KroneckerFactorInverse(3, decay=0.9, damping=1.0)
    >>> k.update(torch.tensor([1.0, 0.0, 0.0]))
    >>> round(k.inverse[0, 0].item(), 6)  # 1 / (0.9 * 1 + 0.1 * 1)
    1.0
"""

from __future__ import annotations

import torch

from curvature import kernels
from curvature.core import checks as _checks

COMPUTE_DTYPE = torch.float64


class KroneckerFactorInverse:
    """Sherman-Morrison-maintained inverse of ``L_t = decay L_{t-1} + (1-decay) u u^T``.

    Args:
        dim: size of the factor.
        decay: ``gamma`` in ``(0, 1)``.
        damping: ``lambda > 0``, the initial factor is ``damping * I``.
        device, dtype: storage of the inverse (float64 by default).
        form: ``"factor"`` (moving average of the factor, the paper's equation) or
            ``"inverse"`` (moving average of the inverse toward ``I``, the authors' code).
    """

    def __init__(
        self,
        dim: int,
        *,
        decay: float,
        damping: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        form: str = "factor",
    ) -> None:
        self.form = _checks.one_of("form", form, ("factor", "inverse"))
        self.dim = _checks.positive_int("dim", dim)
        self.decay = _checks.in_unit_interval("decay", decay)
        if self.decay == 0.0:
            raise ValueError("decay must be in (0, 1): decay=0 makes the factor u u^T, singular")
        self.damping = _checks.positive("damping", damping)
        self.dtype = dtype or torch.float64
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.inverse = torch.eye(dim, dtype=self.dtype, device=self.device) / self.damping  # L_t^-1
        self.num_updates = 0

    def update(self, u: torch.Tensor) -> None:
        """Fold ``u`` (``[dim]``, or ``[k, dim]`` applied in order) into the moving average."""
        rows, _ = _checks.as_rows("u", u, self.dim)
        inv = self.inverse.to(COMPUTE_DTYPE).contiguous()  # the stored tensor when float64
        for row in rows.to(device=self.device, dtype=COMPUTE_DTYPE):
            kernels.mkor_rank1_update([inv], [row], self.decay, self.form)
        self.inverse = inv.to(self.dtype)
        self.num_updates += rows.shape[0]

    @staticmethod
    def update_many(factors: list[KroneckerFactorInverse], vectors: list[torch.Tensor]) -> None:
        """Update several factors (sizes may differ, one decay) at once: one batched kernel call.

        Equal to ``f.update(u)`` for every pair; on CUDA with Triton all float64 factors are
        updated in two kernel launches in place.
        """
        if not factors:
            return
        decay, form = factors[0].decay, factors[0].form
        if any(f.decay != decay or f.form != form for f in factors):
            raise ValueError("update_many needs factors with one decay and one form")
        rows = [_checks.as_rows("u", u, f.dim)[0] for f, u in zip(factors, vectors)]
        if any(r.shape[0] != 1 for r in rows):
            raise ValueError("update_many takes one vector per factor")
        invs = [f.inverse.to(COMPUTE_DTYPE).contiguous() for f in factors]
        kernels.mkor_rank1_update(invs, [r[0].to(COMPUTE_DTYPE) for r in rows], decay, form)
        for f, inv in zip(factors, invs):
            f.inverse = inv.to(f.dtype)
            f.num_updates += 1

    def reset(self, blend: float = 1.0) -> None:
        """Blend the factor back toward ``damping * I``: ``L <- (1 - blend) L + blend * damping * I``.

        ``blend = 1`` is a hard reset. The blended inverse is computed exactly (one ``dim^3``
        inversion), which only happens when the stabiliser fires.
        """
        _checks.in_unit_interval("blend", blend, closed_right=True)
        if blend == 1.0:
            self.inverse = torch.eye(self.dim, dtype=self.dtype, device=self.device) / self.damping
            return
        inv = self.inverse.to(COMPUTE_DTYPE)
        eye = torch.eye(self.dim, dtype=COMPUTE_DTYPE, device=self.device)
        factor = (1.0 - blend) * torch.linalg.inv(inv) + blend * self.damping * eye
        self.inverse = torch.linalg.inv(factor).to(self.dtype)
