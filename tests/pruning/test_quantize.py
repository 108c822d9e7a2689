"""Second-order quantization: the grid, GPTQ against exact sequential OBQ (float64), act-order,
groups, joint pruning and quantization, and round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from models import correlated_inputs, tiny_llama_config

from curvature.pruning import layer_obs, quantize
from curvature.pruning.quantize import Grid

F64 = torch.float64


def _layer(rows=5, cols=24, n=600, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = correlated_inputs(n=n, pairs=cols // 2, seed=seed).to(F64)
    w = torch.randn(rows, cols, generator=gen, dtype=F64)
    return w, 2.0 / n * x.T @ x, x


def test_the_grid_is_the_reference_grid():
    g = Grid(bits=3, group=None)
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 0.0, 0.0], [0.2, 0.4, 0.6]], dtype=F64)
    scale, zero = g.fit(x)
    # asymmetric: [min(x, 0), max(x, 0)] over 7 steps; an all-zero row gets [-1, 1]
    torch.testing.assert_close(scale, torch.tensor([3.0 / 7, 2.0 / 7, 0.6 / 7], dtype=F64))
    torch.testing.assert_close(zero, torch.tensor([round(7 / 3), round(3.5), 0.0], dtype=F64))
    q = g.round(x, scale, zero)
    assert (q[1] == 0).all()  # zero is on the grid: a pruned weight stays exactly zero
    assert (g.codes(x, scale, zero) <= 7).all() and (g.codes(x, scale, zero) >= 0).all()
    s = Grid(bits=4, group=None, symmetric=True)
    scale, zero = s.fit(x)
    assert (zero == 8).all() and scale[0] == pytest.approx(4.0 / 15)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_is_exact_sequential_obq_in_its_column_order(bits):
    w, h, _ = _layer()
    grid = Grid(bits=bits, group=None)
    got = quantize.gptq(w, h, grid, rel_damp=0.01, block=8)
    ref = quantize.obq(w, h, grid, rel_damp=0.01, order=range(w.shape[1]))
    torch.testing.assert_close(got.weight, ref, rtol=1e-9, atol=1e-10)


def test_act_order_is_sequential_obq_in_decreasing_diagonal_order():
    w, h, _ = _layer(seed=2)
    grid = Grid(bits=3, group=None)
    got = quantize.gptq(w, h, grid, act_order=True, block=8)
    order = torch.argsort(torch.diagonal(h), descending=True)
    ref = quantize.obq(w, h, grid, order=order.tolist())
    torch.testing.assert_close(got.weight, ref, rtol=1e-9, atol=1e-10)
    plain = quantize.gptq(w, h, grid, block=8)
    assert not torch.allclose(got.weight, plain.weight)


def test_greedy_obq_is_no_worse_than_gptq_and_both_beat_rounding_to_nearest():
    w, h, x = _layer(seed=1)
    grid = Grid(bits=3, group=None)

    def err(q):
        return float(((x @ (q - w).T) ** 2).sum())

    greedy = err(quantize.obq(w, h, grid, rel_damp=1e-6))
    sweep = err(quantize.gptq(w, h, grid, rel_damp=1e-6).weight)
    nearest = err(quantize.rtn(w, grid).weight)
    assert greedy <= sweep * 1.001 and sweep < 0.7 * nearest


def _codes_on_grid(q: quantize.Quantized, grid: Grid):
    # every weight is scale * (code - zero) of its own group
    s = q.scales.gather(1, q.g_idx[None, :].expand(q.weight.shape[0], -1))
    z = q.zeros.gather(1, q.g_idx[None, :].expand(q.weight.shape[0], -1))
    torch.testing.assert_close(q.weight, s * (q.codes.to(F64) - z), rtol=0, atol=1e-12)
    assert int(q.codes.max()) <= grid.maxq


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_groups_and_a_shorter_last_group(act_order, static):
    w, h, _ = _layer(rows=4, cols=36, seed=3)  # 36 = 16 + 16 + 4: the last group is shorter
    grid = Grid(bits=4, group=16)
    q = quantize.gptq(w, h, grid, act_order=act_order, static_groups=static)
    assert q.scales.shape == (4, 3)
    assert sorted(torch.bincount(q.g_idx).tolist()) == [4, 16, 16]
    _codes_on_grid(q, grid)
    if static:  # static groups are the original consecutive columns
        assert q.g_idx.tolist() == [c // 16 for c in range(36)]


def test_group_grids_fitted_on_current_weights_unless_the_reference_choice_is_asked():
    w, h, _ = _layer(rows=4, cols=32, seed=4)
    grid = Grid(bits=3, group=8)
    now = quantize.gptq(w, h, grid, block=32)
    start = quantize.gptq(w, h, grid, block=32, block_start_groups=True)
    _codes_on_grid(now, grid)
    _codes_on_grid(start, grid)
    assert not torch.allclose(now.scales[:, 1:], start.scales[:, 1:])
    torch.testing.assert_close(now.scales[:, 0], start.scales[:, 0])  # the block's first group
    # with the group as wide as the block, the two choices coincide
    a = quantize.gptq(w, h, Grid(bits=3, group=32), block=32)
    b = quantize.gptq(w, h, Grid(bits=3, group=32), block=32, block_start_groups=True)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_joint_pruning_and_quantization_keeps_the_mask_and_the_grid(nm):
    w, h, _ = _layer(rows=6, cols=32, seed=5)
    grid = Grid(bits=4, group=None)
    q = quantize.gptq(w, h, grid, sparsity=0.5 if nm is None else 0.0, nm=nm)
    assert q.mask is not None and (q.weight[q.mask] == 0).all()
    if nm is None:
        assert int(q.mask.sum()) == 6 * 16
    else:
        assert ((q.weight.reshape(-1, 4) != 0).sum(1) <= 2).all()
    _codes_on_grid(q, grid)
    # the joint sweep's estimate counts the pruned and the rounded weights: above pruning alone
    _, _, est = layer_obs.sparsegpt(w, h, 0.5 if nm is None else 0.0, nm=nm)
    assert q.estimate > est


def test_quantizing_a_pruned_layer_keeps_its_zeros():
    w, h, _ = _layer(rows=6, cols=32, seed=6)
    pruned, mask, _ = layer_obs.sparsegpt(w, h, 0.6)
    q = quantize.gptq(pruned, h, Grid(bits=3, group=16), fixed=mask)
    assert (q.weight[mask] == 0).all()


def test_bad_settings_are_one_line():
    with pytest.raises(ValueError, match=r"^bits must be one of \(2, 3, 4, 8\), got 5"):
        Grid(bits=5)
    w, h, _ = _layer(cols=24)
    with pytest.raises(ValueError, match=r"^group 128 is larger than the 24 input columns of q"):
        quantize.gptq(w, h, Grid(group=128), name="q")
    with pytest.raises(ValueError, match="act_order reorders columns"):
        quantize.gptq(w, h, Grid(group=None), act_order=True, sparsity=0.5)


def _llama(**extra):
    """A tiny grouped-query Llama (4 heads sharing 2 key/value heads), seeded."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    cfg = tiny_llama_config(64, **{**sizes, "max_position_embeddings": 64, **extra})
    return LlamaForCausalLM(cfg).eval()


def _data(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 16), generator=gen) for _ in range(n)]


def _lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def test_quantize_model_gptq_beats_rtn_and_keeps_earlier_zeros():
    import copy

    from curvature.pruning.quantization import Quantize, bits_per_parameter, quantize_model

    model = _llama()
    data, held = _data(), _data(4, seed=7)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :10] = 0  # an earlier pruning
        ref = [model(input_ids=b).logits for b in held]
    errs = {}
    for method in ("gptq", "rtn"):
        m = copy.deepcopy(model)
        rep = quantize_model(
            m, data, _lm_loss, Quantize(bits=3, group=16, method=method), progress=False
        )
        assert len(rep.layers) == 15  # 7 per block and the output head
        assert (m.model.layers[0].mlp.down_proj.weight[:, :10] == 0).all()
        with torch.no_grad():
            errs[method] = sum(
                float(((m(input_ids=b).logits - r) ** 2).mean()) for b, r in zip(held, ref)
            )
        bpp = bits_per_parameter(rep)
        assert bpp["bits_per_weight"] == pytest.approx(3 + 32 / 16)  # a scale and a zero point
        from dataclasses import replace

        rep.part = replace(rep.part, symmetric=True)  # a symmetric grid's zero point is implied
        assert bits_per_parameter(rep)["bits_per_weight"] == pytest.approx(3 + 16 / 16)
    assert errs["gptq"] < errs["rtn"], errs


def test_quantize_model_joint_two_four():
    from curvature.pruning.quantization import Quantize, quantize_model

    model = _llama()
    rep = quantize_model(
        model, _data(), _lm_loss, Quantize(bits=4, group=None), mask="2:4",
        params=["model.layers.0.mlp.up_proj.weight"], progress=False,
    )  # fmt: skip
    w = model.model.layers[0].mlp.up_proj.weight
    assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all()
    _codes_on_grid(rep.layers["model.layers.0.mlp.up_proj.weight"], Grid(bits=4, group=None))


def test_quantize_part_settings_are_checked():
    from curvature.pruning.quantization import Quantize, quantize_model

    with pytest.raises(ValueError, match=r"^method must be one of \('gptq', 'rtn'\), got 'gptg'"):
        Quantize(method="gptg")
    with pytest.raises(ValueError, match="method rtn has neither"):
        Quantize(method="rtn", act_order=True)
    with pytest.raises(ValueError, match="static_groups needs a group size"):
        Quantize(group=None, static_groups=True)
    with pytest.raises(
        ValueError, match=r"^params: 'model.layers.0.mlp.up.weight' is not a parameter.*up_proj"
    ):
        quantize_model(
            _llama(), _data(), _lm_loss, Quantize(), params=["model.layers.0.mlp.up.weight"]
        )


def test_a_head_tied_to_the_embeddings_stays_in_full_precision():
    from curvature.pruning.quantization import Quantize, linear_weights, quantize_model

    model = _llama(num_hidden_layers=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in linear_weights(model)]
    assert "lm_head.weight" not in names and len(names) == 7
    before = model.lm_head.weight.detach().clone()
    rep = quantize_model(model, _data(), _lm_loss, Quantize(bits=4, group=16), progress=False)
    assert len(rep.layers) == 7 and torch.equal(model.lm_head.weight, before)


def test_the_float32_sweep_is_the_float64_sweep_to_rounding():
    w, h, x = _layer(rows=16, cols=64, seed=3)
    grid = Grid(bits=4, group=16)
    hi = quantize.gptq(w, h, grid, block=32)
    lo = quantize.gptq(w, h, grid, block=32, dtype=torch.float32)
    assert lo.weight.dtype == torch.float32
    # the same codes almost everywhere (a few may round the other way), the same output error
    assert float((lo.codes != hi.codes).float().mean()) < 0.02
    err = {
        k: float(((x @ (q.weight.double() - w).T) ** 2).sum()) for k, q in (("hi", hi), ("lo", lo))
    }
    assert err["lo"] == pytest.approx(err["hi"], rel=0.02)
    from curvature.pruning.quantization import Quantize

    with pytest.raises(ValueError, match=r"^precision must be one of \('float64', 'float32'\)"):
        Quantize(precision="float16")
