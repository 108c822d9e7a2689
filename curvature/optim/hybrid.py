"""Optimizers that split a model's parameters between two update rules.

:class:`MuonAdamW` is the usual way to run an orthogonalised-momentum optimizer on a transformer:
the 2-D weights of the hidden linear layers take ``torch.optim.Muon``; embeddings, output heads,
biases and normalisation gains (for which orthogonalising a momentum matrix has no meaning, or,
for the embeddings and heads, is known to hurt) take AdamW. Both halves share one learning rate:
Muon's step is scaled with ``adjust_lr_fn="match_rms_adamw"`` (its update's RMS matches AdamW's,
``0.2 * sqrt(max(rows, cols))``), so an AdamW learning rate is a sensible starting point for both.

:class:`Combined` presents several optimizers as one ``torch.optim.Optimizer``: its
``param_groups`` are the children's own group dicts, so a learning-rate scheduler, the Trainer and
``accelerate`` drive all of them; ``state_dict`` holds one entry per child.
"""

from __future__ import annotations

import torch

#: modules whose name contains one of these stay on AdamW (output heads; embeddings are not Linear)
HEADS = ("classifier", "lm_head", "qa_outputs", "cls.predictions", "score")


class Combined(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped together."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        seen: set[int] = set()
        for opt in optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError("Combined: a parameter is in two optimizers")
                    seen.add(id(p))
        self.optimizers = list(optimizers)
        # no Optimizer.__init__: the groups and state are the children's own objects
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self):  # type: ignore[override]
        return [g for opt in self.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value):  # Optimizer internals may assign; the groups are the children's
        pass

    @property
    def state(self):  # type: ignore[override]
        out = {}
        for opt in self.optimizers:
            out.update(opt.state)
        return out

    @state.setter
    def state(self, value):
        pass

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("optimizers")
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise ValueError(
                f"Combined: the saved state has {len(parts or [])} optimizers, this one "
                f"{len(self.optimizers)}"
            )
        for opt, part in zip(self.optimizers, parts):
            opt.load_state_dict(part)

    def __repr__(self) -> str:
        return f"Combined({', '.join(type(o).__name__ for o in self.optimizers)})"


def muon_split(model: torch.nn.Module, exclude=HEADS) -> tuple[list, list]:
    """``(muon_params, adamw_params)``: the 2-D weights of ``nn.Linear`` modules (and of
    Hugging Face's transposed ``Conv1D``) whose name contains none of ``exclude``, and the rest.
    Trainable parameters only; a tied parameter is listed once."""
    muon_ids: set[int] = set()
    for name, mod in model.named_modules():
        if any(e in name for e in exclude):
            continue
        weight = getattr(mod, "weight", None)
        linear = isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"
        if linear and isinstance(weight, torch.nn.Parameter) and weight.ndim == 2:
            muon_ids.add(id(weight))
    # a weight tied to an excluded module (an input embedding tied to the output head) stays AdamW
    for name, mod in model.named_modules():
        if any(e in name for e in exclude) or isinstance(mod, torch.nn.Embedding):
            for p in mod.parameters(recurse=False):
                muon_ids.discard(id(p))
    muon, rest, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if id(p) in muon_ids else rest).append(p)
    return muon, rest


class MuonAdamW(Combined):
    """``torch.optim.Muon`` on the hidden linear layers' weights, AdamW on everything else.

    ``lr`` and ``weight_decay`` apply to both halves (Muon's step RMS-matched to AdamW's);
    ``momentum``/``nesterov``/``ns_steps`` are Muon's, ``betas``/``eps`` AdamW's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 1e-4,
        *,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        exclude: list[str] | None = None,
    ):
        muon, rest = muon_split(model, tuple(exclude) if exclude is not None else HEADS)
        if not muon:
            raise ValueError("muon: the model has no 2-D hidden linear weights for Muon")
        parts = [
            torch.optim.Muon(
                muon,
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adjust_lr_fn="match_rms_adamw",
            )
        ]
        if rest:
            parts.append(
                torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
            )
        super().__init__(parts)
        self.num_muon = sum(p.numel() for p in muon)
        self.num_adamw = sum(p.numel() for p in rest)


__all__ = ["HEADS", "Combined", "MuonAdamW", "muon_split"]
