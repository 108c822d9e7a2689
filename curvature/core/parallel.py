"""Where this process stands in ``torch.distributed``: the one check every layer uses."""

from __future__ import annotations

import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
