"""A pruning target: one parameter seen as rows of ``block`` consecutive weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Blocks handled per chunk in the block loops: bounds the float64 temporaries (~64 MB).
CHUNK_BYTES = 64 << 20


@dataclass
class Target:
    """One parameter to prune, flattened row-major and cut into blocks of ``block`` weights."""

    name: str
    param: torch.nn.Parameter
    block: int

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.numel / self.block)

    @property
    def key(self) -> str:
        """The name its blocks are filed under (a piece of a parameter adds its block range)."""
        return self.name

    def flat(self, flat_param: torch.Tensor) -> torch.Tensor:
        """Its weights of the parameter's flat vector (all of them; a piece takes its range)."""
        return flat_param

    def weights_and_fixed(self, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, B]`` float64 weights and the pruned-earlier flags of ``masks`` (a ``MaskSet``)."""
        w = self.blocks_of(self.flat(self.param.detach().flatten()).to(torch.float64))
        m = masks.get(self.name)
        if m is None:
            return w, torch.zeros(self.num_blocks, self.block, dtype=torch.bool, device=w.device)
        return w, self.blocks_of(self.flat(m.flatten()), fill=False)

    def blocks_of(self, flat: torch.Tensor, fill=0) -> torch.Tensor:
        """``flat`` (``numel`` entries) as ``[num_blocks, block]``, the tail padded with ``fill``."""
        pad = self.num_blocks * self.block - self.numel
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad), value=fill)
        return flat.view(self.num_blocks, self.block)

    def valid(self) -> torch.Tensor:
        """``[num_blocks, block]``: False on the padding past the parameter's last weight."""
        v = torch.ones(self.num_blocks * self.block, dtype=torch.bool, device=self.param.device)
        v[self.numel :] = False
        return v.view(self.num_blocks, self.block)

    def chunks(self):
        """Slices of blocks small enough for the float64 temporaries of one block loop."""
        step = max(1, CHUNK_BYTES // (self.block * self.block * 8))
        for s in range(0, self.num_blocks, step):
            yield slice(s, min(self.num_blocks, s + step))
