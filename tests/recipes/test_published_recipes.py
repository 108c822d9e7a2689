"""The 25 published oBERT and M-FAC recipes load, fit their models, and run unchanged.

The recipes are read from the shared folder beside the repository (never copied into it).
"""

from pathlib import Path

import pytest
import torch
from models import tiny_bert_config

from curvature.recipes import RecipeManager, load_recipe
from curvature.recipes.schema import (
    DistillationModifier,
    GMPruningModifier,
    MFACPruningModifier,
    OBSPruningModifier,
    SetLearningRateModifier,
    SetWeightDecayModifier,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "published-recipes"
OBERT = sorted((SHARED / "obert").glob("*.yaml"))
MFAC = sorted((SHARED / "mfac").glob("*.md"))

pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"the published recipes are not beside the repository ({SHARED})"
)


def test_all_25_are_there():
    assert len(OBERT) == 21 and len(MFAC) == 4


def bert_for(recipe_path: Path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tiny_bert_config(vocab_size=17, num_labels=3)
    name = recipe_path.name
    if "squad" in name:
        return tf.BertForQuestionAnswering(tiny_bert_config(vocab_size=17, num_labels=2))
    if "mlm" in name:
        return tf.BertForMaskedLM(cfg)
    return tf.BertForSequenceClassification(cfg)


@pytest.mark.parametrize("path", OBERT, ids=lambda p: p.name)
def test_obert_recipe_loads_and_fits_its_model(path):
    recipe = load_recipe(path)
    model = bert_for(path)
    manager = RecipeManager(recipe, model)  # checks names and mask fit against the model
    sched = manager.pruning_schedule()
    for m in recipe.of(OBSPruningModifier):
        assert m.num_grads == 1024 and m.fisher_block_size in (32, 50) and m.damp == 1e-7
        assert m.grad_sampler_kwargs["batch_size"] in (8, 16)
        assert [t for _, _, t in sched] == sorted(t for _, _, t in sched)
    (dist,) = recipe.of(DistillationModifier)
    batch = {"input_ids": torch.randint(5, 17, (2, 8))}
    outputs = model(**batch)
    manager.check_outputs(list(outputs.keys()))  # every distilled output exists


class Point(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 1)


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.point = Point(c)

    def forward(self, x):
        return torch.relu(self.point.conv(x))


class TinyMobileNet(torch.nn.Module):
    """The parameter names of the published MobileNet recipes (sections.i.j.point.conv)."""

    def __init__(self, c=8, classes=4):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
        self.sections = torch.nn.Sequential(
            *[torch.nn.Sequential(*[Block(c) for _ in range(n)]) for n in (1, 2, 2, 6, 2)]
        )
        self.head = torch.nn.Linear(c, classes)

    def forward(self, x):
        x = self.sections(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


class TinyMNISTNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def image_batches(shape, classes, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, *shape, generator=gen), torch.randint(0, classes, (4,), generator=gen))
        for _ in range(n)
    ]


def ce(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def run_plain_loop(recipe, model, batches, steps_per_epoch=1, lr=1e-2):
    """A plain PyTorch loop driving the manager; returns the manager and the applied rates."""
    manager = RecipeManager(recipe, model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=1e-4)
    manager.masks.attach(model, opt)
    total = max(1, round(recipe.num_epochs * steps_per_epoch))
    rates, decays = [], []
    for step in range(total + 1):
        epoch = step / steps_per_epoch
        if manager.step(epoch, grad_data=batches, loss_fn=ce, optimizer=opt, progress=False):
            manager.masks.attach(model, opt)
        rates.append(opt.param_groups[0]["lr"])
        decays.append(opt.param_groups[0]["weight_decay"])
        if step < total:
            opt.zero_grad()
            ce(model, batches[step % len(batches)]).backward()
            opt.step()
    return manager, rates, decays


@pytest.mark.parametrize("path", MFAC, ids=lambda p: p.name)
def test_mfac_study_recipe_runs_unchanged(path):
    recipe = load_recipe(path)
    torch.manual_seed(0)
    if "mnistnet" in path.name:
        model, batches = TinyMNISTNet(), image_batches((1, 8, 8), 10)
    else:
        model, batches = TinyMobileNet(), image_batches((3, 6, 6), 4)
    manager, rates, decays = run_plain_loop(recipe, model, batches)
    params = dict(model.named_parameters())
    (pruner,) = recipe.of(MFACPruningModifier, GMPruningModifier)
    for final, patterns in pruner.finals().items():
        names = manager._names_of(pruner)
        assert names
        for name in names:
            if name in [
                n for n, _ in __import__("curvature").pruning.select_params(model, patterns)
            ]:
                s = float((params[name] == 0).float().mean())
                assert abs(s - final) <= 1.0 / params[name].numel() + 1e-9, (name, s, final)
    assert manager.history and all(h["method"] == pruner.method for h in manager.history)
    if isinstance(pruner, MFACPruningModifier):
        # the published M-FAC method: independent OBS scores and corrections, M-FAC inverse
        assert all(h["selection"] == "independent" for h in manager.history)
        assert all(h["gradients"] == pruner.grads_at(0.0) for h in manager.history[:1])
        assert all(
            h["estimated_loss_increase"] > 0 for h in manager.history if h["target_sparsity"]
        )
    for m in recipe.of(SetLearningRateModifier):
        assert rates[-1] == pytest.approx(m.learning_rate)
    for m in recipe.of(SetWeightDecayModifier):
        assert decays[-1] == m.weight_decay and decays[0] == 1e-4


def test_published_obert_recipe_runs_unchanged_on_a_tiny_bert():
    """30epochs_unstructured80_mnli.yaml as published: 7 OBS points of 1024 gradients each."""
    path = SHARED / "obert" / "30epochs_unstructured80_mnli.yaml"
    recipe = load_recipe(path)
    model = bert_for(path).double()
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(5, 17, (4, 8), generator=gen),
            "labels": torch.randint(0, 3, (4,), generator=gen),
        }
        for _ in range(4)
    ]

    def loss(model, b):
        return model(**b).loss

    manager = RecipeManager(recipe, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    manager.masks.attach(model, opt)
    for epoch in range(31):  # one step per epoch: 30 steps, pruning at epochs 2, 6, ..., 26
        if manager.step(
            float(epoch), grad_data=batches, loss_fn=loss, optimizer=opt, progress=False
        ):
            manager.masks.attach(model, opt)
        if epoch == 1:
            assert opt.param_groups[0]["lr"] == pytest.approx(5e-5 + (5e-6 - 5e-5) * 0.5)
        if epoch < 30:
            opt.zero_grad()
            loss(model, batches[epoch % 4]).backward()
            opt.step()
    assert [h["epoch"] for h in manager.history] == [2, 6, 10, 14, 18, 22, 26]
    assert [h["gradients"] for h in manager.history] == [1024] * 7
    assert manager.history[0]["target_sparsity"] == pytest.approx(0.7)
    assert manager.sparsity() == pytest.approx(0.8, abs=1e-3)
