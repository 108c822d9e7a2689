"""OBS really uses curvature: ground truth on least squares, and wins over magnitude."""

import copy
import itertools

import pytest
import torch
from models import correlated_inputs, full_loss, prune_copy, trained_mlp

from curvature.pruning import obs, parts, prune

F64 = torch.float64


def least_squares_layer(n=64, d=12, seed=0):
    """A linear layer and per-example data whose empirical Fisher equals its Hessian X^T X / n.

    Targets are set so that every residual is exactly 1 at the current weights; the gradient of
    example i is then x_i, and (1/n) sum g g^T = X^T X / n is the exact Hessian of the loss.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64) @ torch.randn(d, d, generator=gen, dtype=F64)
    layer = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1, d, generator=gen, dtype=F64))
        t = layer(x).squeeze(1) - 1.0
    data = [(x[i : i + 1], t[i : i + 1]) for i in range(n)]

    def loss_fn(model, batch):
        xb, tb = batch
        return 0.5 * ((model(xb).squeeze(1) - tb) ** 2).mean()

    return layer, x, t, data, loss_fn


@pytest.mark.parametrize("block_size", [12, 4])
def test_greedy_matches_brute_force_reconstruction(block_size):
    layer, x, t, data, loss_fn = least_squares_layer()
    w0 = layer.weight.detach().clone().squeeze(0)
    report = prune(
        layer,
        data,
        loss_fn=loss_fn,
        sparsity=0.5,
        params=["weight"],
        progress=False,
        method=parts.OBS(gradients=len(data), block_size=block_size, fisher_damping=1e-6),
    )
    w = layer.weight.detach().squeeze(0)
    pruned = report.masks.get("weight").squeeze(0)
    assert int(pruned.sum()) == 6 and torch.all(w[pruned] == 0)
    # Brute force: the best kept weights for this mask under the (block-diagonal) quadratic.
    h = x.T @ x / len(x) + 1e-6 * torch.eye(12, dtype=F64)  # the damped Fisher, exactly
    for s in range(0, 12, block_size):
        sl = slice(s, s + block_size)
        hb, keep = h[sl, sl], ~pruned[sl]
        # minimise (w' - w0)^T H (w' - w0) with w'_pruned = 0: H_KK w'_K = H_K: w0
        best = torch.linalg.solve(hb[keep][:, keep], hb[keep] @ w0[sl])
        torch.testing.assert_close(w[sl][keep], best, rtol=1e-7, atol=1e-9)


def test_greedy_order_is_exact_sequential_obs_on_a_tiny_block():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=gen, dtype=F64)
    h = a @ a.T + 0.1 * torch.eye(6, dtype=F64)
    w = torch.randn(1, 6, generator=gen, dtype=F64)
    order, cost = obs.greedy_order(
        w, torch.linalg.inv(h)[None], torch.ones(1, 6, dtype=torch.bool), 1
    )

    # Brute force each step: the increase of the optimal quadratic loss when adding one weight.
    def best_loss(mask):
        if not mask:
            return 0.0
        s = list(mask)
        hinv = torch.linalg.inv(h)
        ws = w[0, s]
        return 0.5 * (ws @ torch.linalg.solve(hinv[s][:, s], ws)).item()

    chosen = []
    for step in range(6):
        cands = {
            q: best_loss(chosen + [q]) - best_loss(chosen) for q in range(6) if q not in chosen
        }
        q = min(cands, key=cands.get)
        assert order[0, step].item() == q
        assert abs(cost[0, step].item() - cands[q]) < 1e-9 * max(1.0, abs(cands[q]))
        chosen.append(q)
    # and the summed costs equal the best loss of each prefix (any mask: brute force over subsets)
    for k in (2, 3):
        best = min(best_loss(list(c)) for c in itertools.combinations(range(6), k))
        assert cost[0, :k].sum().item() >= best - 1e-9


def _prune_copy(model, x, y, **kw):
    obs = {"gradients": 64, "fisher_damping": 1e-8} if kw.get("method") != "magnitude" else {}
    kw = {"block_size": 16, **obs, **kw}
    return prune_copy(model, x, y, batch_size=8, **kw)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_obs_beats_magnitude_on_correlated_inputs(sparsity):
    x = correlated_inputs()
    model, y = trained_mlp(x)
    dense = full_loss(model, x, y)
    mag, _ = _prune_copy(model, x, y, sparsity=sparsity, method="magnitude")
    greedy, _ = _prune_copy(model, x, y, sparsity=sparsity)
    d_mag = full_loss(mag, x, y) - dense
    d_greedy = full_loss(greedy, x, y) - dense
    assert d_greedy < 0.5 * d_mag, (d_greedy, d_mag)


def test_obs_correction_reduces_loss_for_its_own_mask():
    x = correlated_inputs(seed=1)
    model, y = trained_mlp(x, seed=1)
    for selection in ("greedy", "independent"):
        pruned, report = _prune_copy(model, x, y, sparsity=0.6, selection=selection)
        masked = copy.deepcopy(model)  # same mask, no correction
        with torch.no_grad():
            for name, p in masked.named_parameters():
                if name in report.masks:
                    p.masked_fill_(report.masks.get(name), 0.0)
        assert full_loss(pruned, x, y) < full_loss(masked, x, y)


def test_greedy_beats_independent_on_near_duplicates():
    # Both members of a near-duplicate pair score low alone; independent OBS prunes both and its
    # summed correction is wrong, greedy moves each pruned weight onto its partner.
    x = correlated_inputs(pairs=16, noise=0.005, seed=2)
    model, y = trained_mlp(x, seed=2)
    dense = full_loss(model, x, y)
    ind, _ = _prune_copy(model, x, y, sparsity=0.5, selection="independent", params=["0.weight"])
    gr, _ = _prune_copy(model, x, y, sparsity=0.5, selection="greedy", params=["0.weight"])
    assert full_loss(gr, x, y) - dense < full_loss(ind, x, y) - dense
