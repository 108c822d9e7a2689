"""Structured pruning: the structured OBS update against least squares, greedy against brute force,
traced structures per architecture, resized models equal to masked ones, saving and loading."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from models import correlated_inputs, tiny_bert, tiny_llama_config

from curvature.pruning import structured, structured_obs, structures

F64 = torch.float64


def _layer(rows=6, groups=5, width=3, n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = correlated_inputs(n=n, pairs=(groups * width + 1) // 2, seed=seed).to(F64)[
        :, : groups * width
    ]
    x = x + 0.3 * torch.randn(n, 1, generator=gen, dtype=F64)  # a shared, non-zero mean
    w = torch.randn(rows, groups * width, generator=gen, dtype=F64)
    idx = torch.arange(groups * width).reshape(groups, width)
    return w, x, idx


def _h(x):
    return 2.0 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("width", [1, 3])
def test_structured_obs_is_the_least_squares_refit_of_the_kept_columns(width):
    w, x, idx = _layer(width=width)
    res = structured_obs.remove_structures(w, _h(x), idx, 2, rel_damp=0.0)
    keep = torch.tensor(sorted(set(range(idx.shape[0])) - set(res.removed)))
    ref, err = structured_obs.refit_error(w, x, idx[keep].reshape(-1))
    torch.testing.assert_close(res.weight, ref, rtol=1e-8, atol=1e-9)
    # the cumulative OBS error is the squared output error, times 2/N
    assert res.errors[-1] == pytest.approx(2.0 / x.shape[0] * err, rel=1e-8)


@pytest.mark.parametrize("width", [1, 2])
def test_each_greedy_step_is_the_brute_force_best_single_removal(width):
    w, x, idx = _layer(groups=6, width=width, seed=3)
    res = structured_obs.remove_structures(w, _h(x), idx, 4, rel_damp=0.0)
    gone: list[int] = []
    for step in range(4):
        errs = {}
        for g in set(range(6)) - set(gone):
            keep = sorted(set(range(6)) - set(gone) - {g})
            errs[g] = structured_obs.refit_error(w, x, idx[keep].reshape(-1))[1]
        best = min(errs, key=errs.get)
        assert res.removed[step] == best
        assert res.errors[step] == pytest.approx(2.0 / x.shape[0] * errs[best], rel=1e-7)
        gone.append(best)


def test_greedy_equals_the_best_subset_on_a_tiny_case_and_beats_magnitude():
    # near-duplicate inputs of very different scales: the structure with the largest weights is
    # redundant, magnitude keeps it and loses another; brute force over all pairs agrees with greedy
    w, x, idx = _layer(groups=5, width=1, seed=1)
    res = structured_obs.remove_structures(w, _h(x), idx, 2, rel_damp=0.0)
    best = min(
        itertools.combinations(range(5), 2),
        key=lambda s: structured_obs.refit_error(
            w, x, torch.tensor(sorted(set(range(5)) - set(s)))
        )[1],
    )
    assert sorted(res.removed) == sorted(best)
    mag = torch.argsort(w.norm(dim=0))[:2].tolist()
    keep = torch.tensor(sorted(set(range(5)) - set(mag)))
    w0 = w.clone()
    w0[:, mag] = 0
    mag_err = float(((x @ w0.T - x @ w.T) ** 2).sum())
    assert structured_obs.refit_error(w, x, keep)[1] <= mag_err
    assert res.errors[-1] < 2.0 / x.shape[0] * mag_err


def test_the_bias_absorbs_the_mean_of_the_removed_columns():
    w, x, idx = _layer(width=2, seed=2)
    b = torch.randn(w.shape[0], dtype=F64)
    res = structured_obs.remove_structures(w, _h(x), idx, 2, rel_damp=0.0, bias=b, mean=x.mean(0))
    keep = sorted(set(range(idx.shape[0])) - set(res.removed))
    xa = torch.cat([x[:, idx[keep].reshape(-1)], torch.ones(x.shape[0], 1, dtype=F64)], 1)
    target = x @ w.T + b
    sol = torch.linalg.lstsq(xa, target).solution
    out = x @ res.weight.T + res.bias
    torch.testing.assert_close(out, xa @ sol, rtol=1e-7, atol=1e-8)
    no_bias = structured_obs.remove_structures(w, _h(x), idx, 2, rel_damp=0.0)
    assert ((out - target) ** 2).sum() < ((x @ no_bias.weight.T + b - target) ** 2).sum()


def _llama(heads=4, kv=2):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(
        64, hidden_size=32, intermediate_size=48, num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32,
    )  # fmt: skip
    return OPTForCausalLM(cfg).eval()


def _data(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 64, (3, 10), generator=gen) for _ in range(n)]


def _loss(model, batch):
    """The output with its loss (the gradient parts differentiate it; the others read logits)."""
    if "CausalLM" in type(model).__name__:
        return model(input_ids=batch, labels=batch)
    return model(input_ids=batch, labels=batch[:, 0] % model.config.num_labels)


ARCHS = {"bert": lambda: tiny_bert().eval(), "llama": _llama, "opt": _opt}


def test_traced_structures_per_architecture():
    got = {}
    for name, make in ARCHS.items():
        model = make()
        groups = structures.trace(model, lambda m=model: _loss(m, _data()[0]))
        got[name] = [
            (g.kind, g.block, len(g.producers), g.count, g.width, g.narrow) for g in groups
        ]
    assert got["bert"] == [("heads", b, 3, 2, 8, 8) for b in (0,)] + [
        ("neurons", 0, 1, 32, 1, 0), ("heads", 1, 3, 2, 8, 8), ("neurons", 1, 1, 32, 1, 0)
    ]  # fmt: skip
    # grouped-query: 2 key/value heads, each shared by 2 query heads of 8 (16 o_proj columns)
    assert got["llama"][:2] == [("heads", 0, 3, 2, 16, 8), ("neurons", 0, 2, 48, 1, 0)]
    assert got["opt"][:2] == [("heads", 0, 3, 4, 8, 8), ("neurons", 0, 1, 48, 1, 0)]


def test_a_fused_attention_cannot_be_traced_and_says_so():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    )
    with pytest.raises(ValueError, match=r"^structures: transformer\.h\.0\..* fused Conv1D"):
        structures.trace(model, lambda: _loss(model, _data()[0]))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_resized_model_computes_what_the_masked_model_computes(arch):
    model = ARCHS[arch]()
    batch = _data()[0]
    groups = structures.trace(model, lambda: _loss(model, batch))
    masked = copy.deepcopy(model)
    named = dict(masked.named_modules())
    for g in groups:  # remove the first structure of each group: zero its consumer columns
        cols = g.columns([0]).reshape(-1)
        with torch.no_grad():
            named[g.consumer[0]].weight[:, cols] = 0
        structures.shrink(g, list(range(1, g.count)))
    with torch.no_grad():
        out, ref = _loss(model, batch).logits, _loss(masked, batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())


@pytest.mark.parametrize("method", sorted(structured.CHOOSERS))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_method_prunes_every_architecture_to_its_sizes(arch, method):
    model = ARCHS[arch]()
    before = sum(p.numel() for p in model.parameters())
    rep = structured.run(
        model, _data(), _loss, {"heads": 0.5, "neurons": 0.25}, method, progress=False
    )
    half = {"bert": 1, "llama": 1, "opt": 2}[arch]
    assert rep.sizes["heads"] == [half, half]
    assert rep.sizes["neurons"] == [24 if arch == "bert" else 36] * 2
    assert rep.params_after == sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        assert torch.isfinite(_loss(model, _data()[0]).logits).all()


def test_structured_obs_keeps_the_outputs_closer_than_every_baseline():
    model = _llama()
    data, held = _data(12, seed=0), _data(4, seed=9)
    with torch.no_grad():
        ref = [_loss(model, b).logits for b in held]
    errs = {}
    for method in structured.CHOOSERS:
        m = copy.deepcopy(model)
        structured.run(m, data, _loss, {"heads": 0.5, "neurons": 0.5}, method, progress=False)
        with torch.no_grad():
            errs[method] = sum(
                float(((_loss(m, b).logits - r) ** 2).mean()) for b, r in zip(held, ref)
            )
    assert errs["obs"] < min(v for k, v in errs.items() if k != "obs"), errs


def test_bad_targets_and_methods_are_one_line():
    model = _llama()
    with pytest.raises(
        ValueError,
        match=r"^structure must be one of \('heads', 'neurons'\), got 'head' \(did you mean 'heads'",
    ):
        structured.run(model, _data(), _loss, {"head": 0.5}, progress=False)
    with pytest.raises(ValueError, match=r"^heads must be in \[0, 1\)"):
        structured.run(model, _data(), _loss, {"heads": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"removes all 2 heads of block 0"):
        structured.run(model, _data(), _loss, {"heads": 0.9}, progress=False)
    with pytest.raises(
        ValueError, match=r"^structured method must be one of .*got 'obss' \(did you mean 'obs'"
    ):
        structured.run(model, _data(), _loss, {"heads": 0.5}, "obss", progress=False)
    with pytest.raises(ValueError, match=r"^rel_damp must be > 0"):
        structured.StructuredOBS(rel_damp=-1.0)
    # nothing was changed by the refused calls
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)][:3] == [
        32,
        16,
        16,
    ]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_saved_models_load_back_and_compute_the_same(arch, tmp_path):
    from curvature.integrations.structured import load_structured, save_structured

    model = ARCHS[arch]()
    rep = structured.run(model, _data(), _loss, {"heads": 0.5, "neurons": 0.5}, progress=False)
    info = save_structured(model, rep.groups, tmp_path / arch)
    back = load_structured(tmp_path / arch)
    batch = _data()[0]
    with torch.no_grad():
        torch.testing.assert_close(_loss(back, batch).logits, _loss(model, batch).logits)
    # plain transformers loads it where the configuration can say the sizes (Llama: head_dim)
    assert info["plain_transformers"] == (arch == "llama")
    if info["plain_transformers"]:
        plain = type(model).from_pretrained(tmp_path / arch).eval()
        with torch.no_grad():
            torch.testing.assert_close(_loss(plain, batch).logits, _loss(model, batch).logits)


def test_plan_sizes_picks_the_least_error_within_the_budget_and_refuses_the_impossible():
    # 2 blocks; 4 heads, 8 neurons; removing heads is cheap in error, neurons dear
    curves = {
        "heads": [[0.0, 0.1, 0.3, 2.0]] * 2,
        "neurons": [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]] * 2,
    }
    ms = {
        "heads": {1: 70.0, 2: 80.0, 3: 90.0, 4: 100.0},
        "neurons": {2: 60.0, 4: 75.0, 6: 90.0, 8: 100.0},
    }

    def cost(kept):
        return ms["heads"][kept["heads"]] + ms["neurons"][kept["neurons"]] - 100.0

    plan = structured.plan_sizes(curves, {k: list(v) for k, v in ms.items()}, cost, 100.0 / 1.25)
    # every pair within 80 ms, by error: (2 heads, 8 neurons) costs 0.6 and 80 ms
    assert plan.kept == {"heads": 2, "neurons": 8} and plan.error == pytest.approx(0.6)
    assert plan.targets == {"heads": 0.5, "neurons": 0.0}
    brute = min(
        (sum(c[4 - h] for c in curves["heads"]) + sum(c[8 - n] for c in curves["neurons"]), h, n)
        for h in ms["heads"] for n in ms["neurons"] if cost({"heads": h, "neurons": n}) <= 80.0
    )  # fmt: skip
    assert (brute[1], brute[2]) == (plan.kept["heads"], plan.kept["neurons"])
    with pytest.raises(ValueError, match=r"^the target cannot be met: the smallest sizes"):
        structured.plan_sizes(curves, {k: list(v) for k, v in ms.items()}, cost, 10.0)


def test_per_block_plan_is_the_brute_force_optimum_and_never_worse_than_uniform():
    """Two blocks whose curves differ (block 1's heads are dear, block 0's cheap): the per-block
    plan equals brute force over every per-block choice under the additive latency model, meets
    the budget, is at least as good as the best uniform plan, and keeps different head counts."""
    import itertools

    curves = {
        "heads": [[0.0, 0.1, 0.2, 0.3], [0.0, 2.0, 4.0, 9.0]],
        "neurons": [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]] * 2,
    }
    ms = {
        "heads": {1: 70.0, 2: 80.0, 3: 90.0, 4: 100.0},
        "neurons": {2: 60.0, 4: 76.0, 6: 90.0, 8: 100.0},
    }
    budget = 84.0
    plan = structured.plan_block_sizes(curves, ms, 100.0, budget, units=16)

    def cost(choice):  # choice: heads per block, neurons per block
        return 100.0 - sum((100.0 - ms[k][v]) / 2 for k, vs in choice.items() for v in vs)

    def error(choice):
        return sum(curves[k][b][len(curves[k][b]) - v] for k, vs in choice.items()
                   for b, v in enumerate(vs))  # fmt: skip

    options = [
        {"heads": list(h), "neurons": list(n)}
        for h in itertools.product(ms["heads"], repeat=2)
        for n in itertools.product(ms["neurons"], repeat=2)
    ]
    brute = min((c for c in options if cost(c) <= budget), key=error)
    assert plan.error == pytest.approx(error(brute))
    assert plan.cost == pytest.approx(cost(plan.kept)) and plan.cost <= budget
    assert plan.kept["heads"][0] < plan.kept["heads"][1]  # the cheap block gives up more heads
    assert plan.targets["heads"] == [(4 - v) / 4 for v in plan.kept["heads"]]
    uniform = structured.plan_sizes(
        curves, {k: list(v) for k, v in ms.items()},
        lambda kept: ms["heads"][kept["heads"]] + ms["neurons"][kept["neurons"]] - 100.0, budget,
    )  # fmt: skip
    assert plan.error < uniform.error
    with pytest.raises(ValueError, match=r"^the target cannot be met"):
        structured.plan_block_sizes(curves, ms, 100.0, 10.0)


def test_per_block_targets_prune_each_block_to_its_own_size():
    model = _llama()
    rep = structured.run(
        model, _data(), _loss, {"neurons": [0.25, 0.5], "heads": [0.5, 0.0]}, progress=False
    )
    assert rep.sizes == {"heads": [1, 2], "neurons": [36, 24]}
    assert model.model.layers[1].mlp.down_proj.in_features == 24
    with pytest.raises(ValueError, match=r"^neurons: 3 per-block fractions for 2 blocks"):
        structured.run(_llama(), _data(), _loss, {"neurons": [0.1, 0.1, 0.1]}, progress=False)


def test_error_curves_are_the_greedy_removal_errors_of_the_dense_model():
    model = _llama()
    data = _data(6)
    curves = structured.error_curves(model, data, _loss, rel_damp=0.01, batches=6)
    assert [len(c) for c in curves["heads"]] == [2, 2] and [len(c) for c in curves["neurons"]] == [
        48,
        48,
    ]
    assert all(c[0] == 0.0 and all(b >= a for a, b in zip(c, c[1:])) for c in curves["neurons"])
    # the first block sees the dense model's inputs when it is pruned: its curve at 12 neurons is
    # what sequential pruning of 12 estimates there; later blocks see pruned inputs and differ
    m = copy.deepcopy(model)
    part = structured.StructuredOBS(batches=6, bias=False)
    rep = structured.run(m, data, _loss, {"neurons": 0.25}, part, progress=False)
    assert rep.groups[0].count == 36
    assert rep.errors[0] == pytest.approx(curves["neurons"][0][12], rel=1e-9)
    assert rep.errors[1] != pytest.approx(curves["neurons"][1][12], rel=1e-9)


def test_the_latency_table_is_paired_with_a_dense_copy_and_monotone(monkeypatch):
    """A clock that drifts (every call slower) and is noisy at one size: the table's ratios are
    taken against the dense copy timed beside each size, and a size is never faster than a
    smaller one."""
    from curvature.integrations import latency

    model = tiny_bert().eval()
    calls = []

    def clock(m, batch, reps=7):
        calls.append(m)
        params = float(sum(p.numel() for p in m.parameters()))
        drift = 1.0 + 0.1 * len(calls)  # the machine slows down as the table is measured
        return params * drift

    monkeypatch.setattr(latency, "measure_model", clock)
    batch = {"input_ids": torch.randint(5, 64, (2, 8))}
    table = latency.measure_table(model, batch, rounds=3, steps=4)
    assert model not in calls  # the dense model is timed as a copy, never the caller's own
    dense = float(sum(p.numel() for p in model.parameters()))
    # each size against the dense copy timed just before it: the drift cancels to ~1%
    for kept, ms in table.neurons.items():
        want = table.dense_ms * (dense - (32 - kept) * (16 + 16 + 1) * 2) / dense
        assert ms == pytest.approx(want, rel=0.15)
    assert list(table.neurons.values()) == sorted(table.neurons.values())
    assert latency._envelope({1: 5.0, 2: 4.0, 3: 6.0, 4: 9.0}, 8.0) == {
        1: 5.0,
        2: 5.0,
        3: 6.0,
        4: 8.0,
    }


# ---------------------------------------------------------------- gradient-Fisher structured OBS


def _dense_fisher_greedy(w, g, remove, rel_damp):
    """The same greedy rule on the dense float64 Fisher over the flattened weights, with the
    inverse of the remaining block computed from scratch at every step."""
    m, count, s = g.shape
    flat = g.reshape(m, -1)
    f = flat.T @ flat / m
    f = f + rel_damp * float(f.diagonal().mean()) * torch.eye(count * s, dtype=F64)
    w = w.reshape(-1).clone()
    alive, removed, errors = list(range(count)), [], []
    for _ in range(remove):
        coords = torch.tensor([c * s + i for c in alive for i in range(s)])
        finv = torch.linalg.inv(f[coords][:, coords])
        best = None
        for j, k in enumerate(alive):
            q = torch.arange(j * s, (j + 1) * s)
            wq = w[k * s : (k + 1) * s]
            rho = 0.5 * float(wq @ torch.linalg.solve(finv[q][:, q], wq))
            if best is None or rho < best[0]:
                best = (rho, j, k, q)
        rho, j, k, q = best
        step = -finv[:, q] @ torch.linalg.solve(finv[q][:, q], w[k * s : (k + 1) * s])
        w[coords] += step
        w[k * s : (k + 1) * s] = 0
        alive.remove(k)
        removed.append(k)
        errors.append(rho)
    return w.reshape(count, s), removed, errors


@pytest.mark.parametrize(("m", "count", "s"), [(3, 6, 4), (40, 5, 3), (8, 7, 1)])
def test_fisher_structured_obs_equals_the_dense_fisher_greedy(m, count, s):
    """Rank-deficient (m < count * s), full-rank and single-weight structures; gradients with a
    strong common direction so that the Fisher couples the structures."""
    gen = torch.Generator().manual_seed(m + count)
    common = torch.randn(1, count, s, generator=gen, dtype=F64)
    g = torch.randn(m, count, s, generator=gen, dtype=F64) + 3 * common * torch.randn(
        m, 1, 1, generator=gen, dtype=F64
    )
    w = torch.randn(count, s, generator=gen, dtype=F64)
    got_w, got_removed, got_err = structured.fisher_remove(w, g, count - 2, rel_damp=0.05)
    ref_w, ref_removed, ref_err = _dense_fisher_greedy(w, g, count - 2, rel_damp=0.05)
    assert got_removed == ref_removed
    torch.testing.assert_close(got_w, ref_w, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.tensor(got_err), torch.tensor(ref_err), rtol=1e-8, atol=0)


def test_a_fisher_removal_is_the_constrained_minimum_of_the_quadratic_model():
    """Brute force for one removal: for every structure, the least-squares minimum of
    1/2 d^T F d with that structure's weights set to zero (through F's Cholesky factor), against
    the chosen structure, its update and its error."""
    gen = torch.Generator().manual_seed(7)
    m, count, s = 5, 4, 3
    g = torch.randn(m, count, s, generator=gen, dtype=F64)
    w = torch.randn(count, s, generator=gen, dtype=F64)
    flat = g.reshape(m, -1)
    f = flat.T @ flat / m
    f = f + 0.1 * float(f.diagonal().mean()) * torch.eye(count * s, dtype=F64)
    lt = torch.linalg.cholesky(f).T  # 1/2 d^T F d = 1/2 |lt d|^2
    best = None
    for k in range(count):
        q = torch.arange(k * s, (k + 1) * s)
        r = torch.tensor([i for i in range(count * s) if i not in set(q.tolist())])
        # d_q = -w_q fixed, d_r free: minimise |lt[:, r] d_r - lt[:, q] w_q|^2
        sol = torch.linalg.lstsq(lt[:, r], (lt[:, q] @ w.reshape(-1)[q]).unsqueeze(1)).solution
        d = torch.zeros(count * s, dtype=F64)
        d[q], d[r] = -w.reshape(-1)[q], sol.squeeze(1)
        err = 0.5 * float(d @ f @ d)
        if best is None or err < best[0]:
            best = (err, k, w.reshape(-1) + d)
    new_w, removed, errors = structured.fisher_remove(w, g, 1, rel_damp=0.1)
    assert removed == [best[1]]
    assert errors[0] == pytest.approx(best[0], rel=1e-9)
    torch.testing.assert_close(new_w.reshape(-1), best[2], rtol=1e-8, atol=1e-10)


def test_gradient_parts_take_gradients_of_the_unpruned_model_and_leave_grads_alone():
    """Taylor's scores are sum |w * mean g| over each structure's coupled weights, computed here by
    hand from autograd on the untouched model; the model's .grad is as before the call."""
    model = _llama()
    data = _data(4)
    ref = copy.deepcopy(model)
    groups = structures.trace(ref, lambda: _loss(ref, data[0]), kinds=("neurons",))
    sums = {}
    for batch in data:
        ref.zero_grad()
        _loss(ref, batch).loss.backward()
        for n, p in ref.named_parameters():
            sums[n] = sums.get(n, 0) + p.grad.detach().to(F64) / len(data)
    params = dict(ref.named_parameters())
    g0 = groups[0]  # block 0's neurons: gate and up rows, down columns
    expect = torch.zeros(g0.count, dtype=F64)
    for name, _ in g0.producers:
        w = params[name + ".weight"].detach().to(F64)
        expect += (w * sums[name + ".weight"]).abs().sum(1)
    dname = g0.consumer[0] + ".weight"
    expect += (params[dname].detach().to(F64) * sums[dname]).abs().sum(0)
    stats = structured._collect_gradients(
        ref, data, _loss, groups, structured.Taylor(batches=4), progress=False
    )
    torch.testing.assert_close(structured.Taylor().scores(g0, stats[0]), expect)
    marker = torch.full_like(model.lm_head.weight, 7.0)
    model.lm_head.weight.grad = marker
    structured.run(model, data, _loss, {"neurons": 0.5}, structured.Taylor(), progress=False)
    assert model.lm_head.weight.grad is marker
    removed_lowest = torch.argsort(expect)[: g0.count // 2].sort().values.tolist()
    kept = sorted(set(range(g0.count)) - set(removed_lowest))
    torch.testing.assert_close(
        model.model.layers[0].mlp.down_proj.weight, params[dname].detach()[:, kept]
    )


@pytest.mark.parametrize("kind", ["heads", "neurons"])
def test_fisher_part_writes_the_solver_update_into_the_coupled_weights(kind):
    """The driver's layout: the group's producer rows (grouped-query: query rows per key/value
    head, key and value rows), biases and consumer columns gathered, solved by fisher_remove on
    the same gradients, written back and shrunk: every kept weight is the solver's."""
    model = _llama(heads=4, kv=2)
    data = _data(6, seed=1)
    ref = copy.deepcopy(model)
    groups = structures.trace(ref, lambda: _loss(ref, data[0]), kinds=(kind,))
    part = structured.FisherOBS(gradients=6, rel_damp=0.05)
    stats = structured._collect_gradients(ref, data, _loss, groups, part, progress=False)
    g0 = groups[0]
    w, removed, _ = structured.fisher_remove(
        structured._group_matrix(g0), stats[0].stacked(), g0.count // 2, 0.05
    )
    assert w[removed].abs().max() == 0 and (w != structured._group_matrix(g0)).any()
    rep = structured.run(model, data, _loss, {kind: 0.5}, part, progress=False)
    kept = sorted(set(range(g0.count)) - set(removed))
    torch.testing.assert_close(
        structured._group_matrix(rep.groups[0]), w[kept].to(torch.float32).to(F64)
    )


def test_gradient_parts_refuse_a_loss_they_cannot_differentiate():
    model = _llama()
    with pytest.raises(ValueError, match=r"^structured fisher: loss_fn must return the loss"):
        structured.run(
            model, _data(), lambda m, b: m(input_ids=b), {"neurons": 0.5}, "fisher",
            progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"^gradients must be"):
        structured.FisherOBS(gradients=0)


# ---------------------------------------------------------------- gradual removal


def test_the_optimizer_follows_shrunk_parameters_as_if_they_were_never_larger():
    """AdamW (per-element moments): after rows are removed mid-training, the kept elements move
    exactly as they move in the unshrunk copy given the same gradients."""
    torch.manual_seed(0)
    big = torch.nn.Linear(6, 5)
    small = copy.deepcopy(big)
    opt_big = torch.optim.AdamW(big.parameters(), lr=0.1, weight_decay=0.1)
    opt_small = torch.optim.AdamW(small.parameters(), lr=0.1, weight_decay=0.1)
    keep = torch.tensor([0, 2, 3])
    gen = torch.Generator().manual_seed(1)
    grads = [(torch.randn(5, 6, generator=gen), torch.randn(5, generator=gen)) for _ in range(6)]
    for step, (gw, gb) in enumerate(grads):
        if step == 3:
            with structures.recording() as taken:
                structures._take(small, keep, 0)
            assert structures.follow(opt_small, taken) == 2
            assert small.weight.shape == (3, 6)
        for m, opt in ((big, opt_big), (small, opt_small)):
            rows = slice(None) if m is big or step < 3 else keep
            m.weight.grad, m.bias.grad = gw[rows].clone(), gb[rows].clone()
            opt.step()
    torch.testing.assert_close(small.weight, big.weight[keep], rtol=0, atol=1e-7)
    torch.testing.assert_close(small.bias, big.bias[keep], rtol=0, atol=1e-7)
    assert opt_small.state[small.weight]["exp_avg_sq"].shape == (3, 6)


def test_state_over_a_whole_matrix_cannot_follow_and_nothing_moves():
    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(lin.parameters())
    opt.state[lin.weight]["preconditioner"] = torch.eye(16)
    with structures.recording() as taken:
        structures._take(lin, torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="preconditioner.*cannot follow removed structures"):
        structures.follow(opt, taken)
    assert any(p is taken[0][0] for p in opt.param_groups[0]["params"])  # left as it was


def test_gradual_targets_reach_the_one_shot_counts_by_the_schedule():
    dense = {"heads": [12, 12], "neurons": [100, 100]}
    final = {"heads": [0.5, 0.25], "neurons": 0.7}
    current = copy.deepcopy(dense)
    kept = []
    for x in (0.0, 0.3, 0.6, 0.9, 1.0):
        t = structured.gradual_targets(final, dense, current, x)
        for kind in t:
            current[kind] = [c - int(round(f * c)) for f, c in zip(t[kind], current[kind])]
        kept.append(copy.deepcopy(current))
    assert kept[0] == dense  # nothing at progress 0
    assert kept[-1] == {"heads": [6, 9], "neurons": [30, 30]}  # the one-shot counts
    for a, b in zip(kept, kept[1:]):  # never grows back
        assert all(y <= x for k in a for x, y in zip(a[k], b[k]))
    assert kept[2] == {"heads": [8, 10], "neurons": [58, 58]}  # round(0.6 * 6) = 4 heads gone
    assert structured.gradual_targets(final, dense, kept[-1], 1.0) == {}


@pytest.mark.parametrize("make", [lambda: _llama(heads=8, kv=4), _opt], ids=["gqa", "mha"])
def test_a_model_with_heads_removed_is_traced_again_with_its_own_counts(make):
    """The configuration keeps the dense head counts; the head size and the query heads per
    key/value head are what the second trace holds on to."""
    model = make()
    data = _data()
    assert structured.count(model, data, _loss)["heads"] == [4, 4]
    structured.run(model, data, _loss, {"heads": 0.5}, "magnitude", progress=False)
    assert structured.count(model, data, _loss)["heads"] == [2, 2]
    structured.run(model, data, _loss, {"heads": 0.5}, "magnitude", progress=False)
    groups = structures.trace(model, lambda: _loss(model, data[0]), kinds=("heads",))
    size = model.config.hidden_size // model.config.num_attention_heads
    assert [g.count for g in groups] == [1, 1] and groups[0].narrow == size
    if "Llama" in type(model).__name__:  # one key/value head and its two query heads
        assert groups[0].width == 2 * size
    with torch.no_grad():
        assert torch.isfinite(_loss(model, data[0]).logits).all()


# ---------------------------------------------------------------- whole blocks


def _llama_deep():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(
        64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, num_hidden_layers=4,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _bert_deep():
    from models import tiny_bert_config
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    cfg = tiny_bert_config(64)
    cfg.num_hidden_layers = 4
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("make", [_bert_deep, _llama_deep], ids=["bert", "llama"])
def test_dropped_blocks_compute_the_bypassed_model_and_load_in_plain_transformers(make, tmp_path):
    import transformers

    model = make()
    batch = _data()[0]
    blocks, _ = structures._repeated_blocks(model)
    bypass = [structured._Bypass(blocks[i]) for i in (1, 2)]
    with torch.no_grad():
        want = _loss(model, batch).logits
    for b in bypass:
        b.remove()
    with torch.no_grad():
        assert not torch.allclose(_loss(model, batch).logits, want)  # the bypass did something
    assert structures.drop_blocks(model, [2, 1]) == 2
    with torch.no_grad():
        torch.testing.assert_close(_loss(model, batch).logits, want)
    assert model.config.num_hidden_layers == 2
    model.save_pretrained(tmp_path)
    again = getattr(transformers, type(model).__name__).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_loss(again, batch).logits, want)
    if "Llama" in type(model).__name__:  # the cache index follows the position
        assert [b.self_attn.layer_idx for b in again.model.layers] == [0, 1]
        assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]


def test_the_loss_chooser_is_the_greedy_of_measured_bypass_losses():
    model = _bert_deep()
    data = _data(4)

    def mean_loss(skip):
        blocks, _ = structures._repeated_blocks(model)
        hooks = [structured._Bypass(blocks[i]) for i in skip]
        try:
            with torch.no_grad():
                return sum(float(_loss(model, b).loss) for b in data) / len(data)
        finally:
            for h in hooks:
                h.remove()

    chosen, losses = structured.choose_layers(model, data, _loss, 2, "loss", batches=4)
    first = min(range(4), key=lambda i: mean_loss([i]))
    second = min((i for i in range(4) if i != first), key=lambda i: mean_loss([first, i]))
    assert chosen == [first, second]
    assert losses == pytest.approx([mean_loss([first]), mean_loss([first, second])], rel=1e-6)


def test_angular_scores_are_the_angles_between_each_blocks_hidden_states():
    model = _bert_deep()
    data = _data(2)
    scores = structured.layer_scores(model, data, _loss, batches=2)
    want = [0.0] * 4
    with torch.no_grad():
        for b in data:
            hs = model(input_ids=b, output_hidden_states=True).hidden_states
            for i in range(4):
                cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)
                want[i] += float(torch.arccos(cos.clamp(-1, 1)).sum() / math.pi)
    n = sum(b.numel() for b in data)
    assert scores == pytest.approx([w / n for w in want], rel=1e-5)
    chosen, _ = structured.choose_layers(model, data, _loss, 2, "angular", batches=2)
    assert sorted(chosen) == sorted(sorted(range(4), key=scores.__getitem__)[:2])


def test_removing_every_block_or_an_unknown_chooser_is_one_line():
    model = _bert_deep()
    with pytest.raises(ValueError, match="4 of 4 blocks cannot be removed"):
        structured.choose_layers(model, _data(), _loss, 4)
    with pytest.raises(ValueError, match="layer_method"):
        structured.choose_layers(model, _data(), _loss, 1, "angle")


# ---------------------------------------------------------------- whole modules inside a block


def _without(model, kind, blocks):
    """The reference for a removed module, made without the code under test: a copy whose
    module's output projection has every input column zeroed (it gives its bias, or zeros)."""
    ref = copy.deepcopy(model)
    data = _data(1)
    groups = structures.trace(ref, lambda: _loss(ref, data[0]), kinds=(kind,))
    with torch.no_grad():
        for g in groups:
            if g.block in blocks:
                g.consumer[1].weight.zero_()
    return ref


@pytest.mark.parametrize("arch", ["bert", "llama", "opt"])
@pytest.mark.parametrize("kind", ["attention", "feed_forward"])
def test_a_removed_module_computes_what_it_gives_on_no_input_and_loads_back(arch, kind, tmp_path):
    from curvature.integrations.structured import load_structured, save_structured

    model = _reference_model(arch)
    data = _data(4)
    before = sum(p.numel() for p in model.parameters())
    report = structured.drop_modules(model, data, _loss, kind, 1, batches=4)
    (block,) = report["removed"]
    ref = _without(_reference_model(arch), structured.MODULE_KINDS[kind], [block])
    with torch.no_grad():
        for b in data:
            torch.testing.assert_close(_loss(model, b).logits, _loss(ref, b).logits)
    assert sum(p.numel() for p in model.parameters()) < before
    # the other blocks keep their structures; the removed module is traced as gone
    groups = structures.trace(model, lambda: _loss(model, data[0]))
    left = {(g.kind, g.block) for g in groups}
    assert (structured.MODULE_KINDS[kind], block) not in left and len(left) == 2 * _blocks(
        model
    ) - 1
    info = save_structured(model, groups, tmp_path, extra={"modules": report["modules"]})
    # no configuration says a block without attention (a Llama's replaced attention has no
    # tensors of its own, so the shapes alone would not tell)
    assert info["plain_transformers"] is False or kind == "feed_forward"
    again = load_structured(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_loss(again, data[0]).logits, _loss(ref, data[0]).logits)


def _reference_model(arch):
    return {"bert": _bert_deep, "llama": _llama_deep, "opt": _opt}[arch]()


def _blocks(model):
    return len(structures._repeated_blocks(model)[0])


def test_a_decoder_without_an_attention_module_decodes_with_its_cache_as_without():
    """The removed attention's key/value cache still counts the tokens, so a forward given the
    cache (which reads the positions from its length: the first block's) equals the forward over
    the whole sequence; so does cached generation."""
    model = _llama_deep()
    groups = structures.trace(model, lambda: _loss(model, _data(1)[0]), kinds=("heads",))
    structures.remove_module(model, groups[0], 2)
    ids = _data(1)[0][:1, :8]
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :5], use_cache=True).past_key_values
        assert cache.get_seq_length() == 5
        torch.testing.assert_close(model(ids[:, 5:], cache=cache).logits, full[:, 5:])
    cached = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    fresh = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, fresh) and cached.shape[1] == 11


@pytest.mark.parametrize(
    "make,kind",
    [(_bert_deep, "feed_forward"), (_bert_deep, "attention"), (_llama_deep, "attention")],
    ids=["bert-feed-forward", "bert-attention", "llama-attention"],
)
def test_the_module_chooser_is_the_greedy_of_measured_losses_with_modules_removed(make, kind):
    """BERT's attention output projection lives outside the module, Llama's inside it: the
    chooser's losses are those of the model with the chosen modules' projections zeroed."""
    model = make()
    data = _data(4)
    n = _blocks(model)

    def mean_loss(blocks):
        ref = _without(model, structured.MODULE_KINDS[kind], blocks)
        with torch.no_grad():
            return sum(float(_loss(ref, b).loss) for b in data) / len(data)

    _, chosen, losses, _ = structured.choose_modules(model, data, _loss, kind, 2, 4)
    first = min(range(n), key=lambda i: mean_loss([i]))
    second = min((i for i in range(n) if i != first), key=lambda i: mean_loss([first, i]))
    assert chosen == [first, second]
    assert losses == pytest.approx([mean_loss([first]), mean_loss([first, second])], rel=1e-6)


def test_a_removed_attention_gives_back_a_cache_its_module_returned():
    """Older model code returns the key/value cache from each attention: the replacement gives
    it back in the same place (and the length still counts the tokens)."""
    from transformers import DynamicCache

    class Returns(torch.nn.Module):  # an attention that returns (output, weights, cache)
        def __init__(self):
            super().__init__()
            self.o = torch.nn.Linear(4, 4)

        def forward(self, hidden_states, cache=None):
            return self.o(hidden_states), None, cache

    torch.manual_seed(0)
    attn = Returns()
    hook = structured._Silence.__new__(structured._Silence)
    hook.group = type("G", (), {"consumer": ("o", attn.o)})()
    hook.outputs, hook.cache_slots = 0, ()
    cache = DynamicCache()
    x = torch.randn(1, 3, 4)
    out = hook._output(attn, (x,), attn(x, cache=cache))
    assert hook.outputs == 3 and hook.cache_slots == (2,) and out[2] is cache
    torch.testing.assert_close(out[0], attn.o.bias.expand(1, 3, 4))
    silent = structures.Silent(4, 3, bias=True, head_dim=2, layer_idx=0, cache_slots=(2,))
    got = silent(x, cache=cache)
    assert got[1] is None and got[2] is cache and cache.get_seq_length() == 3
    assert structures.Silent(4, 3)(x)[2] is None  # no cache given, none returned


def test_removing_more_modules_than_are_left_is_one_line():
    model = _bert_deep()
    with pytest.raises(ValueError, match="attention_modules: 5 cannot be removed: the model has 4"):
        structured.drop_modules(model, _data(), _loss, "attention", 5)
    with pytest.raises(ValueError, match="module"):
        structured.drop_modules(model, _data(), _loss, "attn", 1)
