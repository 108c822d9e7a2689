import pytest
import torch
from dense import F64, cancellation_factor, fisher_inverse, make_grads, rel_err

from curvature import KroneckerFactorInverse, SlidingWindowFisherInverse


@pytest.mark.parametrize("window", [1, 4, 7])
@pytest.mark.parametrize("total", [3, 7, 19])
def test_sliding_window_matches_dense(window, total):
    d = 11
    grads = make_grads(total, d, seed=total)
    f = SlidingWindowFisherInverse(d, window=window, damping=1e-3, dtype=F64)
    x = torch.randn(2, d, dtype=F64)
    for i in range(total):
        f.add_grad(grads[i])
        last = grads[max(0, i + 1 - window) : i + 1]
        # warm-up: the Fisher averages over the gradients seen so far, min(seen, window)
        ref = fisher_inverse(last, 1e-3, last.shape[0])
        assert rel_err(f.mul(x), x @ ref) < 1e-10
    assert f.count == min(total, window)


def test_sliding_batch_add_and_before_any_gradient():
    f = SlidingWindowFisherInverse(5, window=3, damping=0.5)
    x = torch.randn(5)
    assert torch.allclose(f.mul(x), x / 0.5)
    g = make_grads(5, 5, seed=1).float()
    f.add_grad(g)
    ref = fisher_inverse(g[2:].double(), 0.5, 3)
    assert rel_err(f.mul(x), ref @ x.double()) < 1e-6


@pytest.mark.parametrize("scale,damp,rank", [(1e2, 1e-8, None), (1e-3, 1e-8, None), (1.0, 1e-5, 2)])
def test_sliding_hard_cases(scale, damp, rank):
    d, window = 40, 8
    grads = make_grads(12, d, scale=scale, rank=rank, seed=3)
    f = SlidingWindowFisherInverse(d, window=window, damping=damp, dtype=F64)
    f.add_grad(grads)
    last = grads[-window:]
    ref = fisher_inverse(last, damp, window)
    x = torch.randn(3, d, dtype=F64)
    # the products solve against s damp I + G G^T (refined against it, whatever the state of the
    # incrementally updated inverse): only the solve's conditioning enters, and the null-space
    # part is exact; bound the error with the same factor.
    tol = max(1e-12, 1e-14 * cancellation_factor(last, damp, window))
    assert rel_err(f.mul(x), x @ ref) < tol
    assert rel_err(f.mul(last[:2]), last[:2] @ ref) < max(1e-10, 10 * tol)


@pytest.mark.parametrize("normalizer", ["seen", "window"])
def test_sliding_incremental_updates_match_dense_over_many_windows(normalizer):
    """A long run (five windows) takes O(m^2) updates, not a factorisation per gradient, and
    stays as accurate as a fresh solve; ``add_and_mul`` equals ``add_grad`` then ``mul``."""
    d, window, total = 30, 6, 30
    grads = make_grads(total, d, seed=5)
    f = SlidingWindowFisherInverse(
        d, window=window, damping=1e-3, dtype=F64, normalizer=normalizer, refresh_every=100
    )
    twin = SlidingWindowFisherInverse(
        d, window=window, damping=1e-3, dtype=F64, normalizer=normalizer, refresh_every=100
    )
    for i in range(total):
        u = f.add_and_mul(grads[i])
        twin.add_grad(grads[i])
        last = grads[max(0, i + 1 - window) : i + 1]
        s = window if normalizer == "window" else last.shape[0]
        ref = fisher_inverse(last, 1e-3, s)
        assert rel_err(u, ref @ grads[i]) < 1e-11
        assert rel_err(twin.mul(grads[i]), u) < 1e-11
        # the inverse itself (before refinement) also stays close to a fresh one
        fresh = torch.linalg.inv(f._matrix())
        assert rel_err(f._inv, fresh) < 1e-9
    # "seen" refactors while the divisor grows (the first `window` gradients), then updates
    assert f.refactors == (1 if normalizer == "window" else window)


def test_sliding_float32_window_accuracy():
    """Float32 storage (the default): the window products run in float32, the m x m algebra in
    float64; the result is as accurate as float32 storage of the gradients allows."""
    d, window = 5000, 16
    grads = make_grads(40, d, seed=7).float()
    f = SlidingWindowFisherInverse(d, window=window, damping=1e-4, normalizer="window")
    for g in grads:
        u = f.add_and_mul(g)
    last = grads[-window:].double()
    ref = fisher_inverse(last, 1e-4, window)
    x = torch.randn(d, dtype=F64)
    cancel = cancellation_factor(last, 1e-4, window)
    assert u.dtype == torch.float32
    assert rel_err(u.double(), ref @ grads[-1].double()) < 1e-7 * cancel
    assert rel_err(f.mul(x.float()).double(), ref @ x) < 1e-7 * cancel


def test_sliding_float32_nearly_parallel_large_gradients_stay_definite():
    """Float32 Gram rows of nearly parallel gradients of norm 1e3 with damp 1e-8: the round-off
    of the float32 products (about 0.1 on Gram entries of 1e6) dwarfs s * damp, and can make
    s damp I + G G^T indefinite. The step must not fail (the inverse is rebuilt from the Gram
    matrix projected to semi-definite); the answer is then only as good as float32 products
    allow, which here is nothing: float64 storage (every step float64) is accurate."""
    d, window = 2000, 8
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(d, generator=gen, dtype=F64)
    grads = base + 1e-4 * torch.randn(40, d, generator=gen, dtype=F64)
    grads = 1e3 * grads / grads.norm(dim=1, keepdim=True)
    x = torch.randn(d, dtype=F64)
    f32 = SlidingWindowFisherInverse(d, window=window, damping=1e-8, normalizer="window")
    f64 = SlidingWindowFisherInverse(d, window=window, damping=1e-8, normalizer="window", dtype=F64)
    for g in grads:
        assert torch.isfinite(f32.add_and_mul(g.float())).all()
        f64.add_grad(g)
    assert f32.projections >= 1  # the branch really ran
    last = grads[-window:]
    ref = fisher_inverse(last, 1e-8, window)
    tol = max(1e-12, 1e-14 * cancellation_factor(last, 1e-8, window))
    assert rel_err(f64.mul(x), ref @ x) < tol
    assert f64.projections == 0


def test_sliding_rejects_bad_input_without_poisoning():
    f = SlidingWindowFisherInverse(4, window=2, damping=1e-2)
    f.add_grad(torch.ones(4))
    state = (f.grads.clone(), f.gram.clone(), f.num_seen)
    with pytest.raises(ValueError, match="g has length 3, expected 4"):
        f.add_grad(torch.ones(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        f.add_grad(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, float("nan"), 0.0, 0.0]]))
    assert torch.equal(f.grads, state[0]) and torch.equal(f.gram, state[1])
    assert f.num_seen == state[2]
    with pytest.raises(ValueError, match="window must be a positive integer"):
        SlidingWindowFisherInverse(4, window=0, damping=1.0)
    with pytest.raises(ValueError, match="damping must be > 0"):
        SlidingWindowFisherInverse(4, window=2, damping=0)


def dense_ema(us, decay, damp):
    lt = torch.eye(us.shape[1], dtype=F64) * damp
    for u in us:
        lt = decay * lt + (1 - decay) * torch.outer(u, u)
    return lt


@pytest.mark.parametrize("dim", [1, 3, 17])
@pytest.mark.parametrize("decay,damp", [(0.9, 1.0), (0.99, 1e-3), (0.5, 1e-6)])
def test_kronecker_inverse_matches_dense(dim, decay, damp):
    gen = torch.Generator().manual_seed(dim)
    us = torch.randn(25, dim, generator=gen, dtype=F64)
    k = KroneckerFactorInverse(dim, decay=decay, damping=damp)
    lt = torch.eye(dim, dtype=F64) * damp
    kappa = 1.0
    for u in us:
        k.update(u)
        lt = decay * lt + (1 - decay) * torch.outer(u, u)
        ref = torch.linalg.inv(lt)
        # The dense inverse is good to about eps * cond(L_t). Sherman-Morrison carries the error
        # of the worst conditioning it has passed through, and the cancellation from I / damp.
        kappa = max(kappa, torch.linalg.cond(lt).item(), 1 / damp / ref.norm(2).item())
        assert rel_err(k.inverse, ref) < max(1e-12, 1e-14 * kappa)
    assert rel_err(k.inverse, torch.linalg.inv(dense_ema(us, decay, damp))) < max(
        1e-12, 1e-14 * kappa
    )
    k2 = KroneckerFactorInverse(dim, decay=decay, damping=damp)
    k2.update(us)  # batch form, applied in order
    assert rel_err(k2.inverse, k.inverse) < 1e-12
    assert k.num_updates == 25


def test_kronecker_reset_blends_toward_identity():
    us = torch.randn(5, 4, dtype=F64)
    k = KroneckerFactorInverse(4, decay=0.8, damping=0.1)
    k.update(us)
    lt = dense_ema(us, 0.8, 0.1)
    k.reset(blend=0.25)
    ref = torch.linalg.inv(0.75 * lt + 0.25 * 0.1 * torch.eye(4, dtype=F64))
    assert rel_err(k.inverse, ref) < 1e-10
    k.reset()
    assert torch.allclose(k.inverse, torch.eye(4, dtype=F64) / 0.1)


def test_kronecker_bad_input():
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        KroneckerFactorInverse(3, decay=1.0, damping=1.0)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        KroneckerFactorInverse(3, decay=0.0, damping=1.0)
    with pytest.raises(ValueError, match="damping must be > 0"):
        KroneckerFactorInverse(3, decay=0.5, damping=-1.0)
    k = KroneckerFactorInverse(3, decay=0.5, damping=1.0)
    before = k.inverse.clone()
    with pytest.raises(ValueError, match="u has length 2, expected 3"):
        k.update(torch.ones(2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        k.update(torch.tensor([1.0, float("inf"), 0.0]))
    assert torch.equal(k.inverse, before)
