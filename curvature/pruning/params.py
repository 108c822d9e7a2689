"""Parameter selection by names, ``re:`` patterns and ``__ALL_PRUNABLE__``."""

from __future__ import annotations

import difflib
import re
import warnings

import torch

ALL_PRUNABLE = "__ALL_PRUNABLE__"
ALL = "__ALL__"
_PRUNABLE_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def prunable_names(model: torch.nn.Module) -> list[str]:
    """Weights of every linear and convolution layer (what ``__ALL_PRUNABLE__`` means)."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _PRUNABLE_TYPES):
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


SKIP_1D = "1-D (biases and norm weights): a pattern prunes matrices and kernels; name one exactly to prune it"


def select_params(model: torch.nn.Module, params: str | list[str], *, with_skipped: bool = False):
    """Resolve a selection to ``(name, parameter)`` pairs in model order.

    Entries are exact parameter names, ``re:PATTERN`` (matched from the start of the name, as the
    recipe format has always done), ``__ALL_PRUNABLE__`` or ``__ALL__``. A pattern selects the
    parameters of two or more dimensions it matches; the 1-D ones it also matches (biases,
    LayerNorm weights, as ``re:bert.encoder.*weight`` does) are skipped, and with
    ``with_skipped=True`` returned as ``{name: reason}`` beside the selection. An entry that
    matches nothing is an error naming the entry and the nearest parameter names.
    """
    skipped: dict[str, str] = {}
    entries = [params] if isinstance(params, str) else list(params)
    if not entries:
        raise ValueError("params is empty: name the parameters to prune or use __ALL_PRUNABLE__")
    named = dict(model.named_parameters())
    chosen: set[str] = set()
    for entry in entries:
        if entry == ALL_PRUNABLE:
            hits = [n for n in prunable_names(model) if n in named]
        elif entry == ALL:
            hits = [n for n, p in named.items() if p.dim() >= 2]
        elif isinstance(entry, str) and entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as exc:
                raise ValueError(
                    f"params entry {entry!r} is not a valid regular expression: {exc}"
                ) from None
            hits = [n for n in named if pattern.match(n)]
            for n in hits:
                if named[n].dim() < 2:
                    skipped[n] = SKIP_1D
            hits = [n for n in hits if named[n].dim() >= 2] or hits
        elif isinstance(entry, str):
            hits = [entry] if entry in named else []
        else:
            raise ValueError(f"params entries must be strings, got {entry!r}")
        if not hits:
            near = difflib.get_close_matches(str(entry).removeprefix("re:"), list(named), n=3)
            hint = f"; nearest parameter names: {', '.join(near)}" if near else ""
            raise ValueError(f"params entry {entry!r} matches no parameter of the model{hint}")
        chosen.update(hits)
    skipped = {n: why for n, why in skipped.items() if n not in chosen}
    selected = [(n, p) for n, p in named.items() if n in chosen]
    return (selected, skipped) if with_skipped else selected


def select_for(model, call):
    """The selected parameters, and those a ``re:`` pattern matched but left out (warned)."""
    named, skipped = select_params(model, call.param_list, with_skipped=True)
    if skipped:
        warnings.warn(
            f"prune: {len(skipped)} parameters matched by a re: pattern were skipped "
            f"({skip_summary(skipped)}); the list is in report.skipped",
            stacklevel=5,
        )
    return named, skipped


def skip_summary(skipped: dict[str, str]) -> str:
    reasons: dict[str, int] = {}
    for why in skipped.values():
        reasons[why] = reasons.get(why, 0) + 1
    return "; ".join(f"{n} {why}" for why, n in reasons.items())
