"""Curvature parts: what the engine knows about the loss near the current weights of a target.

A :class:`Curvature` builds, for each target, a :class:`CurvatureBlocks` from the stage before it
(gradients, or nothing). The solvers read it per chunk of blocks:

- ``inverse(sl)``: ``[n, B, B]`` float64 inverse-curvature blocks (OBS solvers);
- ``diagonal(sl)``: ``[n, B]`` float64 curvature diagonal, or ``None`` for the identity (score-only
  solvers: magnitude is the identity, a layer-input diagonal gives activation-aware scores).

Adding a curvature (the layer-input Hessian of a linear layer, say) is one new class here and
one row in :mod:`curvature.pruning.registry`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from curvature.core import FisherInverse
from curvature.pruning.targets import CHUNK_BYTES, Target

F64 = torch.float64


class CurvatureBlocks:
    """The curvature of one target, read per slice of its blocks."""

    def store(self, path) -> CurvatureBlocks:
        """The same curvature kept in the file ``path`` (memory-mapped) instead of in memory.

        The engine stores the curvature of every memory group but the last between the scoring
        and the update stage, so that gradients are collected once per step whatever the split.
        """
        return self

    def inverse(self, sl: slice) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} has no inverse blocks")

    def diagonal(self, sl: slice) -> torch.Tensor | None:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} has no diagonal")


class Curvature:
    """Builds the curvature of every target of a pruning step."""

    name = "curvature"
    #: whether :meth:`build` consumes per-sample gradients (the gradient-collection stage runs)
    needs_gradients = False

    #: per-example gradients it reads (0: none)
    gradients = 0

    def estimate_bytes(self, target: Target) -> int:
        """Bytes the built curvature of ``target`` holds (for the memory plan)."""
        return 0

    def work_bytes(self, target: Target, batch: int) -> tuple[int, int]:
        """Peak temporaries ``(building with one gradient batch, reading)`` of the curvature of
        ``target``, beyond what :meth:`estimate_bytes` counts."""
        return 0, 0

    def build(
        self, targets: list[Target], gradients: Iterable[dict[str, torch.Tensor]] | None, call
    ) -> dict[str, CurvatureBlocks]:
        """``{name: blocks}``; ``call`` is the call's :class:`~.settings.PruneSettings`."""
        raise NotImplementedError


class _IdentityBlocks(CurvatureBlocks):
    def diagonal(self, sl: slice) -> None:
        return None


class Identity(Curvature):
    """No curvature: every weight costs its square (magnitude pruning)."""

    name = "identity"

    def build(self, targets, gradients, call):
        return {t.name: _IdentityBlocks() for t in targets}


class _FisherBlocks(CurvatureBlocks):
    def __init__(self, fisher: FisherInverse):
        self.fisher = fisher

    def inverse(self, sl: slice) -> torch.Tensor:
        return self.fisher.blocks(sl).to(F64)  # the M-FAC form builds only these blocks

    def diagonal(self, sl: slice) -> torch.Tensor:
        raise NotImplementedError("the Fisher curvature is held as its inverse")

    def store(self, path) -> CurvatureBlocks:
        torch.save(self.fisher.blocks().cpu(), path)
        return _StoredBlocks(path, self.fisher.device)


class _StoredBlocks(CurvatureBlocks):
    """Inverse blocks read back from a file, memory-mapped: the same numbers, off the heap."""

    def __init__(self, path, device):
        self.blocks = torch.load(path, mmap=True, weights_only=True)
        self.device = device

    def inverse(self, sl: slice) -> torch.Tensor:
        return self.blocks[sl].to(device=self.device, dtype=F64)


class EmpiricalFisher(Curvature):
    """Block-diagonal empirical Fisher ``damping*I + (1/m) sum g g^T`` over ``m = gradients``
    per-example gradients, held as its inverse in ``dtype``.

    ``algorithm``: ``"woodbury"`` (``[n, B, B]`` inverse blocks), ``"mfac"`` (the M-FAC form,
    ``m`` rows per weight) or ``"auto"`` (whichever stores less).
    """

    name = "fisher"
    needs_gradients = True

    def __init__(
        self,
        algorithm: str = "auto",
        *,
        gradients: int = 1024,
        damping: float = 1e-7,
        dtype: torch.dtype = torch.float64,
    ):
        self.algorithm = algorithm
        self.gradients = gradients
        self.damping = damping
        self.dtype = dtype

    def estimate_bytes(self, target: Target) -> int:
        return FisherInverse.estimate_bytes(
            target.numel,
            gradients=self.gradients,
            block_size=target.block,
            dtype=self.dtype,
            algorithm=self.algorithm,
        )

    def _algorithm(self, target: Target) -> str:
        if self.algorithm != "auto":
            return self.algorithm
        from curvature.core.fisher import choose_algorithm

        return choose_algorithm(target.numel, self.gradients, target.block)

    def work_bytes(self, target: Target, batch: int) -> tuple[int, int]:
        b, n = target.block, target.num_blocks
        store = torch.empty(0, dtype=self.dtype).element_size()
        k = min(batch, self.gradients)
        if self._algorithm(target) == "woodbury":
            # the float64 rank-k update runs over chunks of 2^24 block entries: G, U and V are
            # [c, B, k] in float64, the product V^T V of the in-place downdate is a [c, B, B]
            # temporary (measured: without it the plan was 20% under the peak), and a float64 copy
            # of the chunk when storage is narrower; reading converts one chunk of blocks to
            # float64 when storage is narrower
            c = min(n, max(1, (1 << 24) // (b * b)))
            narrow = c * b * b * 8 if store != 8 else 0
            return 3 * c * b * k * 8 + c * b * b * 8 + narrow, narrow
        # M-FAC form: each append converts the window to float64 and concatenates a new copy;
        # reading builds one chunk of blocks at a time: its float64 window and two float64
        # B x B temporaries per block
        m = self.gradients
        c = min(n, max(1, CHUNK_BYTES // (b * b * 8)))
        return n * b * m * (8 + store), c * b * (m * 8 + 2 * b * 8)

    def build(self, targets, gradients, call):
        fishers = {
            t.name: FisherInverse(
                t.numel,
                gradients=self.gradients,
                damping=self.damping,
                block_size=t.block,
                dtype=self.dtype,
                device=t.param.device,
                algorithm=self.algorithm,
            )
            for t in targets
        }
        for batch in gradients:
            for t in targets:
                fishers[t.name].add_grad(batch[t.name])
        return {name: _FisherBlocks(f) for name, f in fishers.items()}


class LayerHessian:
    """The input Hessian ``H = 2/N X^T X`` of each linear layer, from calibration forward passes.

    Accumulated in float64: with outlier features (activations 100x the median, as in LLMs)
    ``X^T X`` summed over 10^4 tokens in float32 loses the digits that the Cholesky factor of
    ``H + lambda I`` needs; a ``[cols, cols]`` float64 matrix is a few MB per layer. With
    ``diagonal=True`` only ``diag(H)`` is kept (Wanda's ``||X_j||^2``). Built by the layer-wise
    driver (:mod:`curvature.pruning.layerwise`), which owns the forward passes.
    """

    name = "layer-hessian"

    def __init__(self, diagonal: bool = False):
        self.diagonal = diagonal

    def estimate_bytes(self, target: Target) -> int:
        # the input width is the second dimension (first for GPT-2's transposed Conv1D): the
        # larger one bounds it
        cols = max(target.param.shape) if target.param.dim() == 2 else target.param[0].numel()
        return cols * 8 if self.diagonal else cols * cols * 8
