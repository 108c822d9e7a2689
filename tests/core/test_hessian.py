import pytest
import torch
from torch.func import hessian

from curvature import hessian_vector_product, hutchinson_diagonal, hutchinson_trace

F64 = torch.float64


def small_problem(seed=0):
    """A tiny two-layer tanh network with a cross-entropy loss, float64, with its dense Hessian."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (16,), generator=gen)
    w1 = torch.randn(4, 5, generator=gen, dtype=F64)
    w2 = torch.randn(3, 4, generator=gen, dtype=F64)

    def loss_of(flat):
        a, b = flat[:20].view(4, 5), flat[20:].view(3, 4)
        return torch.nn.functional.cross_entropy(torch.tanh(x @ a.T) @ b.T, y)

    flat = torch.cat([w1.flatten(), w2.flatten()])
    h = hessian(loss_of)(flat)
    p1, p2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    loss = loss_of(torch.cat([p1.flatten(), p2.flatten()]))
    return loss, [p1, p2], h


def test_hvp_matches_dense_hessian():
    loss, params, h = small_problem()
    vs = [torch.randn_like(p) for p in params]
    hv = hessian_vector_product(loss, params, vs)
    ref = h @ torch.cat([v.flatten() for v in vs])
    got = torch.cat([t.flatten() for t in hv])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_diagonal_converges(distribution):
    # Unbiased: the error must shrink like 1/sqrt(samples). Fixed seeds, three sample sizes.
    errors = []
    for n in (16, 256, 4096):
        loss, params, h = small_problem()
        gen = torch.Generator().manual_seed(1)
        est = hutchinson_diagonal(loss, params, n, distribution=distribution, generator=gen)
        got = torch.cat([e.flatten() for e in est])
        errors.append(((got - h.diagonal()).norm() / h.diagonal().norm()).item())
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.25 * errors[0]  # 256x the samples: ~16x smaller expected; demand 4x
    assert errors[2] < 0.1


def test_rademacher_probes_are_signs_with_mean_zero():
    # Guards against the known bug of a draw that is always -1 (it estimates row sums instead).
    w = torch.zeros(2000, requires_grad=True, dtype=F64)
    loss = 0.5 * (w**2).sum() + w.sum() ** 2 * 0.0  # Hessian = I
    gen = torch.Generator().manual_seed(0)
    est = hutchinson_diagonal(loss, [w], 1, generator=gen)[0]
    torch.testing.assert_close(est, torch.ones_like(w))  # z*z = 1 only for +-1 entries
    from curvature.core.hessian import _probe

    z = _probe(w, "rademacher", torch.Generator().manual_seed(3))
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.1


def test_hutchinson_trace_converges_and_seeded():
    loss, params, h = small_problem(2)
    true = h.trace().item()
    rmse = []
    for n in (8, 512):  # 64x the samples: RMSE over seeds should shrink ~8x; demand 3x
        errs = [
            hutchinson_trace(loss, params, n, generator=torch.Generator().manual_seed(s)).item()
            - true
            for s in range(6)
        ]
        rmse.append((sum(e * e for e in errs) / len(errs)) ** 0.5)
    assert rmse[1] < rmse[0] / 3
    a = hutchinson_trace(loss, params, 4, generator=torch.Generator().manual_seed(9))
    b = hutchinson_trace(loss, params, 4, generator=torch.Generator().manual_seed(9))
    assert a == b
    state = torch.get_rng_state()
    hutchinson_trace(loss, params, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never touched


def test_bad_input_messages():
    loss, params, _ = small_problem()
    with pytest.raises(ValueError, match=r"vectors\[1\] has shape \[4\], params\[1\] \[3, 4\]"):
        hessian_vector_product(loss, params, [torch.zeros(4, 5, dtype=F64), torch.zeros(4)])
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        hutchinson_diagonal(loss, params, 0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        hutchinson_trace(loss, params, 2, distribution="uniform")
    with pytest.raises(ValueError, match="loss must be a scalar"):
        hutchinson_trace(torch.ones(2, requires_grad=True) * 2, params, 2)
    with pytest.raises(ValueError, match="does not require grad"):
        hutchinson_diagonal(loss, [torch.zeros(3)], 1)
