import pytest
import torch
from models import batches, ce_loss, correlated_inputs, full_loss, prune_copy, trained_mlp

from curvature.pruning import (
    MaskSet,
    interpolate,
    parse_mask,
    parts,
    prune,
    select_params,
    sparsity_at,
)
from curvature.pruning.params import SKIP_1D
from curvature.pruning.schedule import pruning_points


@pytest.fixture(scope="module")
def problem():
    x = correlated_inputs(n=256, pairs=12)  # 24 inputs: rows divisible by 4 and 8
    model, y = trained_mlp(x, hidden=16, steps=200)
    return model, x, y


def run(problem, **kw):
    model, x, y = problem
    obs = kw.get("method", "obs") != "magnitude"  # magnitude reads no gradient settings
    base = {"gradients": 32, "fisher_damping": 1e-6} if obs else {}
    kw = {"block_size": 8, **base, **kw}
    if not obs:
        kw.pop("selection", None)
    return prune_copy(model, x, y, batch_size=16, **kw)


@pytest.mark.parametrize(
    "method,selection", [("obs", "greedy"), ("obs", "independent"), ("magnitude", "greedy")]
)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.77])
@pytest.mark.parametrize("block_size", [8, 7])  # 7: layers of 384 and 64 weights do not divide
def test_exact_global_sparsity(problem, method, selection, sparsity, block_size):
    m, r = run(
        problem, method=method, selection=selection, sparsity=sparsity, block_size=block_size
    )
    total = sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight"))
    zeros = sum(int((p == 0).sum()) for n, p in m.named_parameters() if n.endswith("weight"))
    assert abs(zeros - round(sparsity * total)) <= 1
    assert abs(r.global_sparsity - sparsity) <= 1 / total
    for name, mask in r.masks.masks.items():
        p = dict(m.named_parameters())[name]
        assert torch.all(p[mask] == 0)


def test_per_layer_sparsity(problem):
    m, r = run(problem, sparsity=0.6, global_sparsity=False)
    for name, s in r.param_sparsity.items():
        n = dict(m.named_parameters())[name].numel()
        assert abs(s - 0.6) <= 1 / n


@pytest.mark.parametrize("method", ["obs", "magnitude"])
@pytest.mark.parametrize("selection", ["greedy", "independent"])
@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_n_m_structure(problem, method, selection, nm):
    n_, m_ = map(int, nm.split(":"))
    m, r = run(
        problem, method=method, selection=selection, mask=nm, sparsity=1 - n_ / m_, block_size=8
    )
    for name, mask in r.masks.masks.items():
        runs = mask.reshape(-1, m_)
        assert torch.all(runs.sum(1) == m_ - n_), name
        p = dict(m.named_parameters())[name]
        assert torch.all(p[mask] == 0)


@pytest.mark.parametrize("selection", ["greedy", "independent"])
def test_block4_structure(problem, selection):
    m, r = run(problem, mask="block4", sparsity=0.5, selection=selection, block_size=8)
    for mask in r.masks.masks.values():
        groups = mask.reshape(-1, 4)
        assert torch.all(groups.all(1) | ~groups.any(1))  # whole groups of 4 only
    assert abs(r.global_sparsity - 0.5) < 4 / 448


def test_obs_structured_beats_magnitude(problem):
    model, x, y = problem
    dense = full_loss(model, x, y)
    for mask, s in (("2:4", 0.5), ("block4", 0.5)):
        obs_m, _ = run(problem, mask=mask, sparsity=s)
        mag_m, _ = run(problem, mask=mask, sparsity=s, method="magnitude")
        assert full_loss(obs_m, x, y) - dense < full_loss(mag_m, x, y) - dense


def test_recomputations_and_existing_masks(problem):
    m, r1 = run(problem, sparsity=0.4)
    before = {k: v.clone() for k, v in r1.masks.masks.items()}
    model, x, y = problem
    r2 = prune(
        m,
        batches(x, y, 16),
        loss_fn=ce_loss,
        sparsity=0.8,
        masks=r1.masks,
        progress=False,
        method=parts.OBS(gradients=32, block_size=8, fisher_damping=1e-6, recomputations=3),
    )
    assert abs(r2.global_sparsity - 0.8) < 1 / 448
    for k, v in before.items():
        assert torch.all(r2.masks.get(k)[v])  # earlier pruned weights stay pruned


def test_masks_survive_optimizer_steps(problem):
    model, x, y = problem
    m, r = run(problem, sparsity=0.5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    r.masks.attach(m, opt)
    for _ in range(5):
        opt.zero_grad()
        ce_loss(m, (x, y)).backward()
        opt.step()
    for name, mask in r.masks.masks.items():
        assert torch.all(dict(m.named_parameters())[name][mask] == 0)
    r.masks.detach()


def test_param_selection_and_errors(problem):
    model, _, _ = problem
    assert [n for n, _ in select_params(model, "__ALL_PRUNABLE__")] == ["0.weight", "2.weight"]
    assert [n for n, _ in select_params(model, ["re:2\\."])] == ["2.weight"]  # 1-D skipped
    assert select_params(model, ["re:2\\."], with_skipped=True)[1] == {"2.bias": SKIP_1D}
    assert [n for n, _ in select_params(model, ["re:.*bias"])] == ["0.bias", "2.bias"]
    with pytest.raises(
        ValueError, match="'0.wieght' matches no parameter.*nearest parameter names: 0.weight"
    ):
        select_params(model, ["0.wieght"])
    with pytest.raises(ValueError, match="sparsity must be in"):
        run(problem, sparsity=1.0)
    with pytest.raises(ValueError, match="block_size 6 is not a multiple of the block4 group of 4"):
        run(problem, sparsity=0.5, mask="block4", block_size=6)
    with pytest.raises(ValueError, match="mask 2:4 prunes exactly 0.5"):
        run(problem, sparsity=0.7, mask="2:4")
    with pytest.raises(ValueError, match="not one of unstructured, block4"):
        parse_mask("blocky")
    with pytest.raises(ValueError, match="method must be one of"):
        run(problem, sparsity=0.5, method="random")
    with pytest.raises(ValueError, match="fisher_damping must be > 0"):
        run(problem, sparsity=0.5, fisher_damping=0.0)
    with pytest.raises(MemoryError, match="lower block_size"):
        run(problem, sparsity=0.5, max_memory=1000)
    bad = torch.nn.Linear(6, 2)
    with pytest.raises(ValueError, match="rows of 6 weights, not divisible by the 2:4 group of 4"):
        prune(
            bad,
            [None],
            loss_fn=lambda m, b: m.weight.sum(),
            sparsity=0.5,
            mask="2:4",
            method=parts.OBS(block_size=4),
        )


def test_memory_groups_give_the_same_result(problem):
    a, ra = run(problem, sparsity=0.6)
    b, rb = run(problem, sparsity=0.6, max_memory=400 * 8 * 8 * 8)  # forces one layer per group
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb)


def test_schedule_values():
    assert interpolate(0.5, "cubic") == pytest.approx(1 - 0.5**3)
    assert interpolate(0.5, "inverse_cubic") == pytest.approx(0.125)
    kw = dict(
        init_sparsity=0.7, final_sparsity=0.9, start_epoch=2, end_epoch=26, update_frequency=2
    )
    assert sparsity_at(1.9, **kw) is None
    assert sparsity_at(2, **kw) == pytest.approx(0.7)
    assert sparsity_at(3.5, **kw) == pytest.approx(0.7)  # holds until the next point
    x = (4 - 2) / 24
    assert sparsity_at(4, **kw) == pytest.approx(0.7 + 0.2 * (1 - (1 - x) ** 3))
    assert sparsity_at(30, **kw) == pytest.approx(0.9)
    assert sparsity_at(4, **{**kw, "inter_func": "linear"}) == pytest.approx(0.7 + 0.2 * x)
    assert pruning_points(start_epoch=2, end_epoch=26, update_frequency=2) == list(range(2, 27, 2))
    with pytest.raises(ValueError, match="inter_func must be one of"):
        interpolate(0.1, "quadratic")


def test_mask_from_zeros_keeps_pattern(problem):
    m, r = run(problem, sparsity=0.5)
    ms = MaskSet.from_zeros(m, list(r.masks.masks))
    for k in r.masks.masks:
        assert torch.equal(ms.get(k), r.masks.get(k))
