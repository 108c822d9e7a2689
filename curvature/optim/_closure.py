"""The closure helper shared by the optimizers."""

from __future__ import annotations

import torch


def run_closure(closure):
    """Evaluate an optimizer closure with autograd enabled (``step`` runs under ``no_grad``)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
