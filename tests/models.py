"""Small trained models and data for the pruning tests (no downloads, all seeded)."""

from __future__ import annotations

import torch


def correlated_inputs(n=512, pairs=16, noise=0.02, seed=0):
    """Inputs made of near-duplicate feature pairs with very different scales per pair."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, pairs, generator=gen)
    scale = torch.logspace(-1, 0.5, pairs)
    x = torch.empty(n, 2 * pairs)
    x[:, 0::2] = base * scale
    x[:, 1::2] = base * scale + noise * torch.randn(n, pairs, generator=gen) * scale
    return x


def trained_mlp(x, classes=4, hidden=16, steps=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(x.shape[1], classes, generator=gen)
    y = (x @ teacher).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, y


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def ce_loss(model, batch):
    xb, yb = batch
    return torch.nn.functional.cross_entropy(model(xb), yb)


def full_loss(model, x, y):
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


#: keywords of prune() itself; any other keyword of :func:`prune_kw` is a part's setting
CALL_KEYWORDS = {"sparsity", "mask", "params", "global_sparsity", "masks", "max_memory", "progress"}


def prune_kw(lenient: bool = False, **kw) -> dict:
    """prune() keywords from call keywords and parts' settings by name (``gradients=8``):
    ``method`` (a name, default ``"obs"``) becomes its pipeline with those settings.

    ``lenient``: one dict of settings shared by cases of several methods; each method takes the
    settings its parts have (``gradients`` is a layer-wise method's ``batches``)."""
    from curvature.pruning import pipeline

    kw = dict(kw)
    pipe = pipeline(kw.pop("method", "obs"))
    settings = {k: kw.pop(k) for k in list(kw) if k not in CALL_KEYWORDS}
    if lenient:
        have = pipe.settings()
        if "batches" in have and "gradients" in settings and "batches" not in settings:
            settings["batches"] = settings["gradients"]
        settings = {k: v for k, v in settings.items() if k in have}
    return {**kw, "method": pipe.with_settings(**settings)}


def prune_copy(model, x, y, *, batch_size, **kw):
    """Prune a deep copy of ``model`` with cross-entropy gradients; returns (copy, report)."""
    import copy

    from curvature.pruning import prune

    m = copy.deepcopy(model)
    kw = {"progress": False, **kw}
    report = prune(m, batches(x, y, batch_size), loss_fn=ce_loss, **prune_kw(**kw))
    return m, report
