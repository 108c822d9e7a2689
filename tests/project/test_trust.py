"""Every path gives the method's answer: memory groups, recipe schedules, released masks.

Each test here failed on the engine and manager before the fixes it guards.
"""

import pytest
import torch
from engine_golden import fixed_batches, golden_bert, loss_fn

from curvature.core import FisherInverse
from curvature.pruning import parts, prune
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
    model = golden_bert()
    counting = CountingLoss()
    report = prune(
        model,
        shuffled_loader(),
        loss_fn=counting,
        sparsity=sparsity,
        mask=mask,
        params=BERT_PARAMS,
        max_memory=max_memory,
        progress=False,
        method=parts.OBS(gradients=12, block_size=8, fisher_damping=1e-4, selection=selection),
    )
    return model, report, counting.calls


def _fisher_bytes(model):
    sizes = [p.numel() for n, p in model.named_parameters() if "encoder" in n and "weight" in n]
    sizes = [s for s in sizes if s > 16]  # LayerNorm weights are not prunable
    return [
        FisherInverse.estimate_bytes(s, gradients=12, block_size=8, dtype=torch.float64)
        for s in sizes
    ]


@pytest.mark.parametrize("selection,mask", [("greedy", "unstructured"), ("independent", "block4")])
@pytest.mark.parametrize("groups", [2, 3])
def test_memory_groups_give_the_same_answer_as_no_split(groups, selection, mask):
    per_target = _fisher_bytes(golden_bert())
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
    model = golden_bert()
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
    model = golden_bert()
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


@pytest.mark.parametrize("seed", range(6))
def test_allocation_by_threshold_equals_a_stable_sort(seed):
    from curvature.pruning.allocation import take_cheapest, take_cheapest_by_sorting

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
        want = take_cheapest_by_sorting(costs, k)
        for g, w in zip(got, want):
            assert torch.equal(g, w), (k, g, w)
        assert sum(int(g.sum()) for g in got) == k


def test_pruning_keeps_the_users_gradients():
    model = golden_bert()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    prune(model, fixed_batches(), loss_fn=loss_fn, sparsity=0.5, params=BERT_PARAMS, progress=False, method=parts.OBS(gradients=4, block_size=8, fisher_damping=1e-4))  # fmt: skip
    assert all(p.grad is not None and torch.all(p.grad == 0.5) for p in model.parameters())


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from curvature.cli.results import plot

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
    trainer = RecipeTrainer(model=golden_bert().float(), args=args, optimizer_name="adahessian")
    assert trainer.args.max_grad_norm == 0.0
    assert args.max_grad_norm == 1.0


RESUME_RECIPE = """
modifiers:
  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 3.0}
  - !OBSPruningModifier
    params: ["re:.*encoder.*(query|key|value|dense)\\\\.weight"]
    init_sparsity: 0.2
    final_sparsity: 0.7
    start_epoch: 0.5
    end_epoch: 2.0
    update_frequency: 0.5
    num_grads: 4
    fisher_block_size: 8
    damp: 1e-4
    grad_sampler_kwargs: {batch_size: 4}
  - !DistillationModifier {hardness: 0.5, temperature: 2.0, distill_output_keys: [logits]}
"""


def _resume_run(out_dir, stop_at=None, resume=None):
    from transformers import TrainerCallback, TrainingArguments

    from curvature.integrations.hf import RecipeCallback, RecipeTrainer

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True

    torch.manual_seed(0)
    model = golden_bert().float()
    gen = torch.Generator().manual_seed(5)
    rows = [
        {"input_ids": torch.randint(5, 17, (8,), generator=gen), "labels": int(i % 2)}
        for i in range(32)
    ]
    manager = RecipeManager(parse_recipe(RESUME_RECIPE, "r.yaml"), model)
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=8, num_train_epochs=3,
        learning_rate=1e-3, save_strategy="steps", save_steps=5, report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    trainer = RecipeTrainer(
        model=model, args=args, train_dataset=rows, manager=manager, teacher="self"
    )
    trainer.add_callback(
        RecipeCallback(
            manager, grad_dataset=rows, before_first_prune=trainer.snapshot_teacher, progress=False
        )
    )
    trainer.add_callback(Stop())
    trainer.train(resume_from_checkpoint=resume)
    return model, manager, trainer


def test_gradual_pruning_resumes_from_a_checkpoint(tmp_path):
    full_model, full, _ = _resume_run(tmp_path / "full")
    _, cut, _ = _resume_run(tmp_path / "cut", stop_at=5)
    assert len(cut.history) == 2  # interrupted after the second pruning point
    model, resumed, trainer = _resume_run(
        tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-5")
    )
    assert isinstance(trainer.teacher, torch.nn.Module)  # the dense "self" teacher came back
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in full.history]
    assert [h["target_sparsity"] for h in resumed.history] == [
        h["target_sparsity"] for h in full.history
    ]
    for name, mask in full.masks.masks.items():
        assert torch.equal(resumed.masks.get(name), mask), name
    for (n, p), (_, q) in zip(model.named_parameters(), full_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_manager_and_masks_round_trip_their_state():
    model = golden_bert()
    recipe = parse_recipe(SCHEDULE.format(leave="true"), "r.yaml")
    a = RecipeManager(recipe, model)
    a.step(0.5, grad_data=fixed_batches(), loss_fn=loss_fn, progress=False)
    b = RecipeManager(recipe, golden_bert())
    b.load_state_dict(a.state_dict())
    assert b.history == a.history and b.due(0.5) == [] and b.due(0.6) == a.due(0.6)
    assert all(torch.equal(b.masks.get(n), m) for n, m in a.masks.masks.items())


@pytest.mark.parametrize("selection", ["greedy", "independent"])
def test_weights_pruned_earlier_stay_pruned_beside_exact_zeros(selection):
    """A weight pruned in an earlier step must not lose its slot to a weight that is exactly 0."""
    from curvature.pruning import MaskSet

    layer = torch.nn.Linear(8, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 1, 2, 3, 0, 5, 6, 7]]))
    masks = MaskSet({"weight": torch.tensor([[False] * 4 + [True] + [False] * 3])})
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 8, generator=gen, dtype=torch.float64) for _ in range(4)]
    prune(layer, data, loss_fn=lambda m, x: m(x).pow(2).mean(), sparsity=0.125, masks=masks, progress=False, method=parts.OBS(gradients=4, block_size=4, fisher_damping=1e-3, selection=selection))  # fmt: skip
    assert masks.get("weight")[0, 4]


def test_a_nan_cost_does_not_empty_the_allocation():
    from curvature.pruning.allocation import take_cheapest

    costs = [torch.tensor([[0.1, float("nan"), 0.3], [0.2, 0.5, 0.6]], dtype=torch.float64)]
    assert [int(c.sum()) for c in take_cheapest(costs, 4)] == [4]
    assert torch.equal(take_cheapest(costs, 4)[0], torch.tensor([1, 3]))
