"""A new part lands in one new file and one registry line.

``Ramp`` is a toy allocation: each layer's target rises linearly with its position in the model,
by ``spread`` around the call's target, shifted so that the size-weighted mean is the target. It
is defined here (this file is the "new file") and registered with one ``register_part`` line;
nothing in the drivers, the settings object, the recipe schema or the command line knows it, and
it prunes from Python, from a recipe and from ``curvature sweep --methods``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_layerwise import LAYERS, LAYERWISE_RECIPE, _lm, lm_loss

from curvature.core import checks
from curvature.pruning import PARTS, chain, prune, register_part
from curvature.pruning.parts import Allocation, SparseGPT


@dataclass(frozen=True)
class Ramp(Allocation):
    spread: float = 0.2
    label: ClassVar[str] = "ramp"

    def __post_init__(self):
        checks.in_range("spread", self.spread, 0.0, 0.5, "[]")

    def allocate(self, model, data, loss_fn, targets, sparsity, context):
        n = len(targets)
        raw = [sparsity + self.spread * ((2 * i / (n - 1) - 1) if n > 1 else 0) for i in range(n)]
        sizes = [t.param.numel() for t in targets]
        shift = sparsity - sum(r * s for r, s in zip(raw, sizes)) / sum(sizes)
        return {t.name: r + shift for t, r in zip(targets, raw)}


@pytest.fixture
def ramp(monkeypatch):
    monkeypatch.setattr(PARTS, "_entries", dict(PARTS._entries))  # unregistered after the test
    register_part("ramp", Ramp)  # the one registry line
    return Ramp


def _check_ramp(allocation, reached, sparsity):
    names = list(allocation)
    assert allocation[names[0]] < sparsity < allocation[names[-1]]
    for n in names:
        assert reached[n] == pytest.approx(allocation[n], abs=0.02), n


def test_a_new_part_prunes_from_python(tmp_path, ramp):
    model, data = _lm(tmp_path, "llama")
    kw = dict(loss_fn=lm_loss, sparsity=0.5, params=LAYERS, progress=False)
    report = prune(model, data, method=chain(ramp(spread=0.2), SparseGPT()), **kw)
    assert report.method == "sparsegpt+ramp"
    _check_ramp(report.allocation, report.param_sparsity, 0.5)
    assert report.global_sparsity == pytest.approx(0.5, abs=0.02)
    assert "ramp_allocation" in report.phases
    # the + spelling builds the same pipeline; the part's own settings are validated
    model2, _ = _lm(tmp_path, "llama")
    r2 = prune(model2, data, method="sparsegpt+ramp", **kw)
    assert r2.allocation == report.allocation
    with pytest.raises(ValueError, match=r"spread must be in \[0, 0.5\]"):
        ramp(spread=0.9)
    with pytest.raises(ValueError, match="ramp: the 2:4 mask fixes"):  # the shared check
        prune(model2, data, method="sparsegpt+ramp", mask="2:4", **kw)


def test_a_new_part_prunes_from_a_recipe(tmp_path, ramp):
    from curvature.recipes import RecipeManager, parse_recipe

    model, data = _lm(tmp_path, "llama")
    recipe = parse_recipe(LAYERWISE_RECIPE.format(method="sparsegpt+ramp", mask="unstructured"))
    manager = RecipeManager(recipe, model)
    (taken,) = manager.step(0.0, grad_data=data, loss_fn=lm_loss, progress=False)
    assert taken["method"] == "sparsegpt+ramp"
    _check_ramp(taken["allocation"], taken["param_sparsity"], 0.5)


def test_a_new_part_prunes_from_the_sweep_command(tmp_path, ramp):
    from models import make_corpus, make_task_model_dir

    from curvature.cli.main import main

    model_dir = make_task_model_dir(tmp_path / "m", "causal-lm", "llama")
    corpus = make_corpus(tmp_path / "c.txt", n_docs=30)
    out = tmp_path / "sweep"
    code = main(
        ["sweep", "--output", str(out), "--model", str(model_dir), "--data", str(corpus),
         "--methods", "sparsegpt,sparsegpt+ramp", "--sparsities", "0.5", "--finetune-epochs", "0",
         "--max-length", "16", "--batches", "3", "--params", r"re:model.layers.*proj.weight",
         "--no-progress", "--speed-reps", "0"]
    )  # fmt: skip
    assert code == 0
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    ramped = [p for p in points if p["method"] == "sparsegpt+ramp"]
    assert ramped and ramped[0]["allocation_min"] < 0.5 < ramped[0]["allocation_max"]
    assert ramped[0]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert torch.isfinite(torch.tensor(ramped[0]["perplexity"]))
