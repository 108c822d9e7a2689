r"""Batched block Woodbury update of damped empirical-Fisher block inverses.

For ``n`` blocks of size ``B`` with inverses ``F_b^{-1}`` and ``k`` gradients ``g_{j,b}``, the
Fisher ``F_b = damp I + (1/m) sum_j g_{j,b} g_{j,b}^T`` gains the ``k`` rank-1 terms:

.. math::  F^{-1} \leftarrow F^{-1} - F^{-1} G^\top (m I_k + G F^{-1} G^\top)^{-1} G F^{-1}

The Triton kernel keeps each block on chip and applies the ``k`` terms one at a time
(Sherman-Morrison, ``u = F^{-1} g``, ``F^{-1} -= u u^T / (m + g^T u)``), reading and writing the
block once per batch of ``k`` gradients; by the Woodbury identity the result is the same matrix.
The torch reference applies the rank-``k`` form with a ``k x k`` Cholesky factor (better on CPU,
where batched matrix products are fast), computing in float64.

Accumulation: float64 for float64 blocks, float32 otherwise (bfloat16 gradients included).
"""

from __future__ import annotations

import torch

from ._triton import AVAILABLE, acc_is_f64, jit, next_pow2, tl

COMPUTE_DTYPE = torch.float64
_CHUNK_ELEMENTS = 1 << 24  # float64 elements of blocks processed at once by the reference


def reference(blocks: torch.Tensor, grads: torch.Tensor, num_grads: float) -> None:
    """In place: ``blocks [n, B, B]`` inverses gain the gradients ``grads [k, n, B]`` (rank-k form)."""
    n, bsz, _ = blocks.shape
    k = grads.shape[0]
    step = max(1, _CHUNK_ELEMENTS // (bsz * bsz))
    eye = torch.eye(k, dtype=COMPUTE_DTYPE, device=blocks.device) * num_grads
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        finv = blocks[sl].to(COMPUTE_DTYPE)  # a view when the storage is already float64
        g = grads[:, sl].to(COMPUTE_DTYPE).permute(1, 2, 0)  # [c, B, k]
        u = finv @ g  # U = F^-1 G^T, [c, B, k]
        c = eye + g.transpose(1, 2) @ u  # C = m I + G U, [c, k, k], SPD
        chol = torch.linalg.cholesky(c)
        # With C = L L^T and V = L^-1 U^T: F^-1 <- F^-1 - V^T V, symmetric by construction.
        v = torch.linalg.solve_triangular(chol, u.transpose(1, 2), upper=False)  # [c, k, B]
        finv.baddbmm_(v.transpose(1, 2), v, alpha=-1.0)
        if finv.data_ptr() != blocks[sl].data_ptr():
            blocks[sl] = finv.to(blocks.dtype)


@jit
def _woodbury_kernel(
    f_ptr, g_ptr, k, bsz, g_stride_k, num_grads, BP: tl.constexpr, F64: tl.constexpr
):
    blk = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BP)
    mr = r < bsz
    fmask = mr[:, None] & mr[None, :]
    fptrs = f_ptr + blk * bsz * bsz + r[:, None] * bsz + r[None, :]
    if F64:
        f = tl.load(fptrs, mask=fmask, other=0.0).to(tl.float64)
    else:
        f = tl.load(fptrs, mask=fmask, other=0.0).to(tl.float32)
    for j in range(k):
        g = tl.load(g_ptr + j * g_stride_k + blk * bsz + r, mask=mr, other=0.0).to(f.dtype)
        u = tl.sum(f * g[None, :], axis=1)  # F^-1 g (F^-1 is symmetric)
        denom = num_grads + tl.sum(g * u, axis=0)
        f = f - (u[:, None] * u[None, :]) / denom
    tl.store(fptrs, f.to(f_ptr.dtype.element_ty), mask=fmask)


def launch(blocks: torch.Tensor, grads: torch.Tensor, num_grads: float) -> None:
    """Triton launcher: one program per block, the block held on chip for all ``k`` gradients."""
    n, bsz, _ = blocks.shape
    k = grads.shape[0]
    if n == 0 or k == 0:
        return
    grads = grads.contiguous()
    bp = next_pow2(bsz)
    _woodbury_kernel[(n,)](
        blocks,
        grads,
        k,
        bsz,
        n * bsz,
        float(num_grads),
        BP=bp,
        F64=acc_is_f64(blocks),
        num_warps=8 if bp >= 64 else 4,
    )


def supported(blocks: torch.Tensor, grads: torch.Tensor) -> bool:
    return AVAILABLE and blocks.is_contiguous() and blocks.shape[-1] <= 256
