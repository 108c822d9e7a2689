"""Mask structures and mask enforcement.

A mask here is a boolean tensor shaped like its parameter, ``True`` where the weight is pruned.
Structures group consecutive entries of a parameter flattened row-major, i.e. along the input
dimension of a linear layer: ``unstructured`` (groups of 1), ``block4`` (4 consecutive weights
pruned together) and ``N:M`` (at most ``M - N`` pruned, exactly ``N`` kept, in every run of ``M``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


def unwrap_optimizer(optimizer):
    """The optimizer inside wrappers that keep it in ``.optimizer`` (accelerate's, for one)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


_NM = re.compile(r"^(\d+):(\d+)$")
MASK_TYPES = ("unstructured", "block4", "N:M (e.g. 2:4, 4:8)")


@dataclass(frozen=True)
class MaskStructure:
    """``group`` weights are pruned together; ``nm`` = (N, M) for semi-structured masks."""

    name: str
    group: int = 1
    nm: tuple[int, int] | None = None

    @property
    def run(self) -> int:
        """Consecutive weights a row length must be divisible by."""
        return self.nm[1] if self.nm else self.group

    @property
    def fixed_sparsity(self) -> float | None:
        return 1.0 - self.nm[0] / self.nm[1] if self.nm else None


def parse_mask(mask: str) -> MaskStructure:
    """``"unstructured"``, ``"block4"`` (also ``"block"``, as older recipes wrote it) or ``"N:M"``."""
    if mask == "unstructured":
        return MaskStructure("unstructured")
    if mask in ("block4", "block"):
        return MaskStructure("block4", group=4)
    m = _NM.match(str(mask))
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"mask {mask!r}: N:M needs 0 < N < M")
        return MaskStructure(f"{n}:{mm}", nm=(n, mm))
    raise ValueError(f"mask {mask!r} is not one of {', '.join(MASK_TYPES)}")


def check_param_fits(name: str, param: torch.Tensor, structure: MaskStructure) -> None:
    row = (
        param.shape[-1]
        if param.dim() == 2
        else param[0].numel()
        if param.dim() > 2
        else param.numel()
    )
    if row % structure.run:
        raise ValueError(
            f"parameter {name} has rows of {row} weights, not divisible by the {structure.name} "
            f"group of {structure.run}; exclude it from params"
        )


class MaskSet:
    """The pruned pattern of several parameters, and its enforcement during training.

    ``attach`` zeroes the gradients of pruned weights (so momentum never builds up on them) and, if
    an optimizer is given, re-applies the masks after every ``optimizer.step()``, so no optimizer
    (with weight decay or momentum) can revive a pruned weight.
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self.masks: dict[str, torch.Tensor] = dict(masks or {})
        self._handles: dict[str, object] = {}  # parameter name (or "" for the optimizer) -> hook

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def get(self, name: str) -> torch.Tensor | None:
        return self.masks.get(name)

    def update(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = mask.detach().to(torch.bool)

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            p = params[name]
            p.masked_fill_(mask.to(p.device), 0.0)

    def attach(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        self.detach()
        params = dict(model.named_parameters())
        for name in self.masks:
            self._handles[name] = params[name].register_hook(
                lambda g, n=name: self._mask_grad(n, g)
            )
        if optimizer is not None:
            inner = unwrap_optimizer(optimizer)
            self._handles[""] = inner.register_step_post_hook(lambda *_: self.apply(model))
        self.apply(model)

    def _mask_grad(self, name: str, g: torch.Tensor) -> torch.Tensor:
        mask = self.masks.get(name)
        return g if mask is None else g.masked_fill(mask.to(g.device), 0.0)

    def release(self, names) -> None:
        """Stop enforcing the masks of ``names``: the weights may grow back (hooks removed)."""
        for name in names:
            self.masks.pop(name, None)
            handle = self._handles.pop(name, None)
            if handle is not None:
                handle.remove()

    def detach(self) -> None:
        for h in self._handles.values():
            h.remove()
        self._handles = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The masks (bool tensors on the CPU), for checkpoints."""
        return {n: m.detach().cpu().clone() for n, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the masks (hooks, if attached, read the new ones: re-attach to add names)."""
        self.masks = {n: m.to(torch.bool) for n, m in state.items()}

    def sparsity(self) -> dict[str, float]:
        return {n: m.float().mean().item() for n, m in self.masks.items()}

    @staticmethod
    def from_zeros(model: torch.nn.Module, names: list[str]) -> MaskSet:
        """Masks of the exact zeros of the named parameters (to keep an existing pattern)."""
        params = dict(model.named_parameters())
        return MaskSet({n: params[n].detach() == 0 for n in names})
