"""Every path gives the method's answer: memory groups, recipe schedules, released masks.

Each test here failed on the engine and manager before the fixes it guards.
"""

import pytest
import torch
from engine_golden import fixed_batches, loss_fn, tiny_bert

from curvature.core import FisherInverse
from curvature.pruning import prune
from curvature.recipes import RecipeManager, parse_recipe

BERT_PARAMS = ["re:.*encoder.*(query|key|value|dense)\\.weight"]


class CountingLoss:
    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return loss_fn(model, batch)


def shuffled_loader():
    """A shuffling DataLoader: every pass draws a new order unless the engine replays it."""
    rows = [
        {"input_ids": b["input_ids"][i], "labels": b["labels"][i]}
        for b in fixed_batches()
        for i in range(len(b["labels"]))
    ]
    return torch.utils.data.DataLoader(
        rows, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3)
    )


def _prune_bert(max_memory, selection="greedy", mask="unstructured", sparsity=0.6):
    model = tiny_bert()
    counting = CountingLoss()
    report = prune(
        model,
        shuffled_loader(),
        loss_fn=counting,
        sparsity=sparsity,
        selection=selection,
        mask=mask,
        params=BERT_PARAMS,
        num_grads=12,
        block_size=8,
        damp=1e-4,
        max_memory=max_memory,
        progress=False,
    )
    return model, report, counting.calls


def _fisher_bytes(model):
    sizes = [p.numel() for n, p in model.named_parameters() if "encoder" in n and "weight" in n]
    sizes = [s for s in sizes if s > 16]  # LayerNorm weights are not prunable
    return [
        FisherInverse.estimate_bytes(s, num_grads=12, block_size=8, dtype=torch.float64)
        for s in sizes
    ]


@pytest.mark.parametrize("selection,mask", [("greedy", "unstructured"), ("independent", "block4")])
@pytest.mark.parametrize("groups", [2, 3])
def test_memory_groups_give_the_same_answer_as_no_split(groups, selection, mask):
    per_target = _fisher_bytes(tiny_bert())
    budget = -(-sum(per_target) // groups)  # cannot fit in fewer than `groups` groups
    ref_model, ref, ref_calls = _prune_bert(None, selection, mask)
    model, rep, calls = _prune_bert(budget, selection, mask)
    assert rep.memory_groups >= groups, f"the budget must really split ({rep.memory_groups} groups)"
    assert ref.memory_groups == 1
    for name, mask_ref in ref.masks.masks.items():
        assert torch.equal(rep.masks.get(name), mask_ref), name
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)
    # one collection per group (the same batches replayed), none again for the update
    assert ref_calls == 12
    assert calls == 12 * rep.memory_groups


SCHEDULE = """
modifiers:
  - !OBSPruningModifier
    params: ["re:.*encoder.*(query|key|value|dense)\\\\.weight"]
    init_sparsity: 0.1
    final_sparsity: 0.9
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.1
    leave_enabled: {leave}
    num_grads: 4
    fisher_block_size: 8
    damp: 1e-4
"""


def test_overtaken_pruning_points_are_never_replayed():
    model = tiny_bert()
    manager = RecipeManager(parse_recipe(SCHEDULE.format(leave="true"), "r.yaml"), model)
    calls = 0
    for k in range(0, 9):  # a step every 0.25 epoch: coarser than the 0.1 pruning points
        calls += len(
            manager.step(0.25 * k, grad_data=fixed_batches(), loss_fn=loss_fn, progress=False)
        )
    targets = [h["target_sparsity"] for h in manager.history]
    assert calls == len(manager.history) == 5  # epochs 0, 0.25, 0.5, 0.75, 1.0
    assert targets == sorted(targets) and targets[-1] == pytest.approx(0.9)
    assert len({h["epoch"] for h in manager.history}) == len(manager.history)


def test_masks_released_after_end_epoch_when_leave_enabled_is_false():
    model = tiny_bert()
    manager = RecipeManager(parse_recipe(SCHEDULE.format(leave="false"), "r.yaml"), model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager.masks.attach(model, opt)
    batches = fixed_batches()
    for k in range(12):  # past end_epoch 1.0
        epoch = 0.125 * k
        if manager.step(epoch, grad_data=batches, loss_fn=loss_fn, optimizer=opt, progress=False):
            manager.masks.attach(model, opt)
        opt.zero_grad()
        loss_fn(model, batches[k % len(batches)]).backward()
        opt.step()
    assert not manager.masks.masks
    w = dict(model.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    assert (w == 0).float().mean() < 0.5  # trained on: the released weights moved again


def _take_cheapest_by_sorting(costs, k):
    """The allocation as one stable sort of every cost (the reference the selection must equal)."""
    from curvature.pruning import obs

    flat = [torch.cummax(c.clamp_min(obs.FIXED_SCORE), dim=1).values for c in costs]
    allv = torch.cat([f.flatten() for f in flat])
    owner = torch.cat([torch.full((f.numel(),), i, dtype=torch.long) for i, f in enumerate(flat)])
    order = torch.argsort(allv, stable=True)[:k]
    out, offset = [], 0
    for i, f in enumerate(flat):
        picked = order[owner[order] == i]
        out.append(torch.bincount((picked - offset) // f.shape[1], minlength=f.shape[0]))
        offset += f.numel()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_allocation_by_threshold_equals_a_stable_sort(seed):
    from curvature.pruning.allocation import take_cheapest

    gen = torch.Generator().manual_seed(seed)
    costs = []
    for rows, cols in [(5, 8), (3, 4), (7, 8)]:
        # few distinct values: many ties across and inside blocks, plus fixed and padding steps
        c = torch.randint(0, 4, (rows, cols), generator=gen).double()
        c[torch.rand(rows, cols, generator=gen) < 0.1] = -1.0
        c[:, -1] = float("inf") if seed % 2 else c[:, -1]
        costs.append(c)
    total = sum(c.numel() for c in costs)
    for k in [0, 1, 7, total // 2, total - 3, total]:
        got = take_cheapest(costs, k)
        want = _take_cheapest_by_sorting(costs, k)
        for g, w in zip(got, want):
            assert torch.equal(g, w), (k, g, w)
        assert sum(int(g.sum()) for g in got) == k


def test_pruning_keeps_the_users_gradients():
    model = tiny_bert()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    prune(model, fixed_batches(), loss_fn=loss_fn, sparsity=0.5, params=BERT_PARAMS,
          num_grads=4, block_size=8, damp=1e-4, progress=False)  # fmt: skip
    assert all(p.grad is not None and torch.all(p.grad == 0.5) for p in model.parameters())


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from curvature.cli.sweep import plot

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        rows = [
            {"method": "dense", "mask": "-", "mode": "-", "sparsity": 0.0, "accuracy": 0.9},
            {
                "method": "obs",
                "mask": "unstructured",
                "mode": "oneshot",
                "sparsity": 0.5,
                "accuracy": 0.8,
            },
        ]
        plot(rows, tmp_path / "p.png")
        assert (tmp_path / "p.png").stat().st_size > 0
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_trainer_does_not_mutate_the_callers_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from curvature.integrations.hf import RecipeTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path), max_grad_norm=1.0, report_to=[], use_cpu=True
    )
    trainer = RecipeTrainer(model=tiny_bert().float(), args=args, optimizer_name="adahessian")
    assert trainer.args.max_grad_norm == 0.0
    assert args.max_grad_norm == 1.0
