"""Fine-tuning defaults of ``curvature train`` (a light module: ``--help`` reads it)."""

from __future__ import annotations

# Fine-tuning defaults for a small BERT (MiniLM) at batch size 16, chosen by a short learning-rate
# probe on bbc-news (docs/bench-optim.md); ``--lr`` and ``--opt`` override them.
DEFAULTS: dict[str, tuple[float, dict]] = {
    "adamw": (1e-4, {"weight_decay": 0.01}),
    "adahessian": (1e-2, {"weight_decay": 0.01}),
    "mkor": (1e-4, {"base_optimizer": "adamw", "weight_decay": 0.01, "exclude": ["classifier"]}),
    "mkor-h": (1e-4, {"base_optimizer": "adamw", "weight_decay": 0.01, "exclude": ["classifier"]}),
    "mfac": (3e-2, {"num_grads": 16, "damp": 1e-4}),
    "sgd": (1e-2, {"momentum": 0.9}),
    "lamb": (1e-3, {"weight_decay": 0.01}),
    "muon": (1e-4, {"weight_decay": 0.01}),
    "soap": (1e-4, {"weight_decay": 0.01}),
}


def describe() -> str:
    """One line per optimizer: its default learning rate and keywords."""
    return "; ".join(
        f"{name} lr {lr:g}" + ("".join(f", {k}={v}" for k, v in kw.items()) if kw else "")
        for name, (lr, kw) in DEFAULTS.items()
    )
