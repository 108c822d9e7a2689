r"""Batched block Woodbury update of damped empirical-Fisher block inverses.

For ``n`` blocks of size ``B`` with inverses ``F_b^{-1}`` and ``k`` gradients ``g_{j,b}``, the
Fisher ``F_b = damping I + (1/m) sum_j g_{j,b} g_{j,b}^T`` gains the ``k`` rank-1 terms:

.. math::  F^{-1} \leftarrow F^{-1} - F^{-1} G^\top (m I_k + G F^{-1} G^\top)^{-1} G F^{-1}

The Triton kernel keeps each block on chip and applies the ``k`` terms one at a time
(Sherman-Morrison, ``u = F^{-1} g``, ``F^{-1} -= u u^T / (m + g^T u)``), reading and writing the
block once per batch of ``k`` gradients; by the Woodbury identity the result is the same matrix.
The torch reference applies the rank-``k`` form with a ``k x k`` Cholesky factor (better on CPU,
where batched matrix products are fast), computing in float64.

Precision: both paths accumulate in float64 whatever the storage dtype (float32 or bfloat16 blocks
and gradients are widened on load and rounded once on store), so float32 storage meets the same
error bound through either path.

Sizes: the kernel holds a whole padded block in registers, one program per block. Compiled for
sm_80/sm_90 (``scripts/check_kernels.py``) it fits without spilling up to ``B = 64`` (padded 64:
93 registers per thread at 16 warps); larger blocks go to the torch reference, whose batched
products are the efficient form there. :func:`config` is the one place that chooses a launch.
"""

from __future__ import annotations

import torch

from ._triton import AVAILABLE, jit, next_pow2, offset64, tl

COMPUTE_DTYPE = torch.float64
_CHUNK_ELEMENTS = 1 << 24  # float64 elements of blocks processed at once by the reference
MAX_BLOCK = 64  # the largest block the kernel holds in registers without spilling (sm_80, sm_90)


def reference(blocks: torch.Tensor, grads: torch.Tensor, gradients: float) -> None:
    """In place: ``blocks [n, B, B]`` inverses gain the gradients ``grads [k, n, B]`` (rank-k form)."""
    n, bsz, _ = blocks.shape
    k = grads.shape[0]
    step = max(1, _CHUNK_ELEMENTS // (bsz * bsz))
    eye = torch.eye(k, dtype=COMPUTE_DTYPE, device=blocks.device) * gradients
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
def _woodbury_kernel(f_ptr, g_ptr, k, bsz, g_stride_k, gradients, BP: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BP)
    mr = r < bsz
    fmask = mr[:, None] & mr[None, :]
    fptrs = f_ptr + blk * bsz * bsz + r[:, None] * bsz + r[None, :]
    f = tl.load(fptrs, mask=fmask, other=0.0).to(tl.float64)
    g_base = g_ptr + blk * bsz + r
    for j in range(k):  # j * n * B passes 2^31 at BERT sizes: 64-bit offsets
        g = tl.load(g_base + offset64(j, g_stride_k), mask=mr, other=0.0).to(tl.float64)
        u = tl.sum(f * g[None, :], axis=1)  # F^-1 g (F^-1 is symmetric)
        denom = gradients + tl.sum(g * u, axis=0)
        f = f - (u[:, None] * u[None, :]) / denom
    tl.store(fptrs, f.to(f_ptr.dtype.element_ty), mask=fmask)


def config(bsz: int) -> dict:
    """The launch parameters of a block of size ``bsz`` (constexprs and warps)."""
    bp = next_pow2(bsz)
    return {"BP": bp, "num_warps": 16 if bp >= 64 else (8 if bp >= 32 else 4)}


def launch(blocks: torch.Tensor, grads: torch.Tensor, gradients: float) -> None:
    """Triton launcher: one program per block, the block held on chip for all ``k`` gradients."""
    n, bsz, _ = blocks.shape
    k = grads.shape[0]
    if n == 0 or k == 0:
        return
    if bsz > MAX_BLOCK:
        raise ValueError(f"the Woodbury kernel takes blocks up to {MAX_BLOCK}, got {bsz}")
    grads = grads.contiguous()
    cfg = config(bsz)
    _woodbury_kernel[(n,)](blocks, grads, k, bsz, n * bsz, float(gradients), **cfg)


def supported(blocks: torch.Tensor, grads: torch.Tensor) -> bool:
    return AVAILABLE and blocks.is_contiguous() and blocks.shape[-1] <= MAX_BLOCK
