"""GPU kernels for the memory-bound hot paths, each beside a plain torch reference.

Installed as ``curvature.kernels``. Every operation has one public function here, and one
function, :func:`backend`, decides which implementation runs:

- ``"triton"`` when Triton is installed, the tensors are on a CUDA device and the kernel supports
  the shapes and dtypes;
- ``"torch"`` otherwise: CPU tensors, no Triton, or ``CURVATURE_KERNELS=torch`` in the environment.

``CURVATURE_KERNELS=triton`` forces the Triton path for any device; with ``TRITON_INTERPRET=1``
(set before this package is imported) that runs the kernels in Triton's CPU interpreter, which is
how the tests check kernel == reference without a GPU.

Operations:

- :func:`woodbury_update` — batched block Woodbury update of Fisher block inverses (oBERT).
- :func:`obs_scores` — OBS saliencies of single weights or ``g``-weight groups, and the N:M mask.
- :func:`obs_update` — the oBERT weight update fused with zeroing the pruned weights.
- :func:`obs_greedy` — the greedy OBS sequence of every block (order and cost of each prune).
- :func:`adahessian_update` — the fused AdaHessian parameter update.
- :func:`mkor_rank1_update` — Sherman-Morrison updates of many MKOR factor inverses at once.

This package depends on torch (and optionally Triton) only, never on the rest of ``curvature``,
so the core can call it without a cycle.
"""

from __future__ import annotations

import os

import torch

from . import adahessian as _adahessian
from . import mkor as _mkor
from . import obs as _obs
from . import woodbury as _woodbury
from ._triton import AVAILABLE as TRITON_AVAILABLE

MODES = ("auto", "torch", "triton")


def _mode() -> str:
    mode = os.environ.get("CURVATURE_KERNELS", "auto").lower()
    if mode not in MODES:
        raise ValueError(f"CURVATURE_KERNELS must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def backend(*tensors: torch.Tensor, supported: bool = True) -> str:
    """``"triton"`` or ``"torch"`` for an operation on ``tensors`` (the one place that decides)."""
    mode = _mode()
    if mode == "torch" or not TRITON_AVAILABLE or not supported:
        return "torch"
    if mode == "triton":
        return "triton"
    return "triton" if all(t.is_cuda for t in tensors) else "torch"


def woodbury_update(blocks: torch.Tensor, grads: torch.Tensor, gradients: float) -> None:
    """In place: block inverses ``[n, B, B]`` gain the gradients ``[k, n, B]`` (``F = damping I + GG^T/m``)."""
    if backend(blocks, grads, supported=_woodbury.supported(blocks, grads)) == "triton":
        _woodbury.launch(blocks, grads, gradients)
    else:
        _woodbury.reference(blocks, grads, gradients)


def obs_scores(
    w: torch.Tensor, hinv: torch.Tensor, group: int = 1, nm: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """OBS scores ``[n, B/g]`` of ``w [n, B]`` under block inverses ``[n, B, B]``.

    With ``nm=(N, M)`` (``group=1``) also returns the bool mask of the ``M - N`` lowest scores in
    every run of ``M`` (True = pruned); otherwise the mask is ``None``.
    """
    if backend(w, hinv, supported=_obs.supported(w, group, nm)) == "triton":
        return _obs.launch_scores(w, hinv, group, nm)
    scores = _obs.reference_scores(w, hinv, group)
    return scores, (_obs.reference_nm_select(scores, *nm) if nm is not None else None)


def obs_update(
    w: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor, group: int = 1
) -> torch.Tensor:
    """oBERT weight update: ``w - H c`` with the pruned groups' ``c_Q = (H_QQ)^-1 w_Q``; pruned -> 0."""
    if backend(w, hinv, supported=_obs.supported(w, group)) == "triton":
        return _obs.launch_update(w, hinv, pruned, group)
    return _obs.reference_update(w, hinv, pruned, group)


def obs_greedy(
    w: torch.Tensor,
    hinv: torch.Tensor,
    valid: torch.Tensor,
    group: int = 1,
    *,
    fixed: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS inside every block: ``order [n, steps]`` and ``cost [n, steps]`` (float64).

    See :func:`curvature.kernels.obs.reference_greedy` for the arguments.
    """
    if backend(w, hinv, supported=_obs.greedy_supported(w, group, nm)) == "triton":
        return _obs.launch_greedy(w, hinv, valid, group, fixed, nm, steps)
    return _obs.reference_greedy(w, hinv, valid, group, fixed, nm, steps)


def adahessian_update(params, grads, diags, exp_avgs, exp_hessians, steps, hessian_steps, **hyper):
    """In place AdaHessian step of a group's parameters (``diags`` = raw estimates, or None)."""
    if (
        backend(*params, supported=_adahessian.supported(params, exp_avgs, exp_hessians))
        == "triton"
    ):
        _adahessian.launch_group(
            params, grads, diags, exp_avgs, exp_hessians, steps, hessian_steps, **hyper
        )
    else:
        _adahessian.reference_group(
            params, grads, diags, exp_avgs, exp_hessians, steps, hessian_steps, **hyper
        )


def mkor_rank1_update(
    inverses: list[torch.Tensor], vectors: list[torch.Tensor], decay: float, form: str = "factor"
) -> None:
    """In place: each factor inverse folds in its vector. ``form="factor"``:
    ``L <- decay L + (1-decay) u u^T`` inverted exactly; ``"inverse"``: the MKOR code's
    ``A <- SM(decay A + (1-decay) I, u)`` (see :mod:`curvature.kernels.mkor`)."""
    if not inverses:
        return
    if backend(*inverses, supported=_mkor.supported(inverses)) == "triton":
        _mkor.launch(inverses, vectors, decay, form)
    else:
        _mkor.reference(inverses, vectors, decay, form)


__all__ = [
    "MODES",
    "TRITON_AVAILABLE",
    "adahessian_update",
    "backend",
    "mkor_rank1_update",
    "obs_greedy",
    "obs_scores",
    "obs_update",
    "woodbury_update",
]
