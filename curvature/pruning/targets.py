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
