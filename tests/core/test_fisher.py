import pytest
import torch
from dense import F64, cancellation_factor, fisher_inverse, make_grads, rel_err

from curvature import FisherInverse
from curvature.core.fisher import choose_algorithm

ALGS = ["woodbury", "mfac"]


def build(grads, damp, block_size, algorithm, gradients=None, chunk=3, dtype=None):
    m = gradients or grads.shape[0]
    f = FisherInverse(
        grads.shape[1],
        gradients=m,
        damping=damp,
        block_size=block_size,
        algorithm=algorithm,
        dtype=dtype,
    )
    for s in range(0, grads.shape[0], chunk):  # batches of uneven size, then singles
        f.add_grad(grads[s : s + chunk] if chunk > 1 else grads[s])
    return f


@pytest.mark.parametrize("algorithm", ALGS)
@pytest.mark.parametrize("block_size", [None, 1, 4, 7, 23])
@pytest.mark.parametrize("chunk", [1, 3])
def test_matches_dense(algorithm, block_size, chunk):
    d, m = 23, 9  # 23 is not divisible by 4 or 7
    grads = make_grads(m, d, seed=1)
    f = build(grads, 1e-2, block_size, algorithm, chunk=chunk)
    ref = fisher_inverse(grads, 1e-2, m, block_size)
    x = torch.randn(4, d, dtype=F64)
    assert rel_err(f.mul(x), x @ ref) < 1e-11
    assert rel_err(f.mul(x[0]), ref @ x[0]) < 1e-11
    assert rel_err(f.diag(), ref.diagonal()) < 1e-11
    blocks = f.blocks()
    for i, s in enumerate(range(0, d, f.block_size)):
        e = min(d, s + f.block_size)
        assert rel_err(blocks[i, : e - s, : e - s], ref[s:e, s:e]) < 1e-11


@pytest.mark.parametrize("algorithm", ALGS)
@pytest.mark.parametrize(
    "scale,damp,rank",
    [
        (1e-3, 1e-8, None),  # tiny gradients, tiny damping
        (1e2, 1e-8, None),  # large gradients, tiny damping: cond(F) ~ 1e11
        (1.0, 1e-5, None),  # the case where float32 recursions fail (rel. error > 1)
        (1e2, 1e-6, 3),  # nearly low-rank gradient set
        (1e-3, 1e-8, 2),
    ],
)
def test_hard_cases(algorithm, scale, damp, rank):
    d, m, block = 30, 16, 12
    grads = make_grads(m, d, scale=scale, rank=rank, seed=2)
    f = build(grads, damp, block, algorithm, chunk=5)
    ref = fisher_inverse(grads, damp, m, block)
    x = torch.randn(3, d, dtype=F64)
    # Both algorithms start from I/damp and cancel down to 1/(damp + s^2) in the gradient
    # directions, so float64 keeps about 16 - log10(kappa) digits, kappa = 1 + s_max^2 / damp
    # (s_max: the largest singular value of a block's G / sqrt(m)). The bound is that, not better.
    tol = 1e-14 * cancellation_factor(grads, damp, m, block)
    assert rel_err(f.mul(x), x @ ref) < max(tol, 1e-12)
    assert rel_err(f.diag(), ref.diagonal()) < max(tol, 1e-12)
    g = grads[:3]  # the directions where F^-1 is smallest
    assert rel_err(f.mul(g), g @ ref) < max(10 * tol, 1e-11)


@pytest.mark.parametrize("algorithm", ALGS)
def test_float32_storage_is_still_accurate(algorithm):
    # Storage in float32, computation in float64: the error is float32 rounding times the
    # cancellation factor, nowhere near the O(1) failure of float32 computation.
    grads = make_grads(12, 20, scale=1.0, seed=3)
    f = build(grads, 1e-5, 8, algorithm, dtype=torch.float32)
    ref = fisher_inverse(grads, 1e-5, 12, 8)
    x = torch.randn(20, dtype=F64)
    err = rel_err(f.mul(x), ref @ x)
    assert err < 1e-7 * cancellation_factor(grads, 1e-5, 12, 8)
    assert err < 1e-3


def test_float32_gradients_accepted():
    grads = make_grads(6, 10, seed=4)
    f = build(grads.float(), 1e-3, 5, "woodbury")
    ref = fisher_inverse(grads.float().double(), 1e-3, 6, 5)
    x = torch.randn(10)
    out = f.mul(x)
    assert out.dtype == torch.float32
    assert rel_err(out, ref @ x.double()) < 1e-6


@pytest.mark.parametrize("algorithm", ALGS)
def test_partial_fill_uses_declared_num_grads(algorithm):
    grads = make_grads(4, 10, seed=5)
    f = build(grads, 1e-2, None, algorithm, gradients=16)
    ref = fisher_inverse(grads, 1e-2, 16, None)
    assert rel_err(f.diag(), ref.diagonal()) < 1e-11


def test_algorithms_agree_and_auto_choice():
    assert choose_algorithm(1000, 64, 50) == "woodbury"
    assert choose_algorithm(1000, 64, None) == "mfac"
    grads = make_grads(8, 40, seed=6)
    a = build(grads, 1e-4, 10, "woodbury")
    b = build(grads, 1e-4, 10, "mfac")
    assert rel_err(a.diag(), b.diag()) < 1e-10
    assert FisherInverse(100, gradients=8, damping=1.0).algorithm == "mfac"
    assert FisherInverse(100, gradients=8, damping=1.0, block_size=4).algorithm == "woodbury"


def test_estimate_bytes_matches_allocation():
    f = FisherInverse(101, gradients=4, damping=1.0, block_size=10, algorithm="woodbury")
    est = FisherInverse.estimate_bytes(101, gradients=4, block_size=10, algorithm="woodbury")
    assert est == f._blocks.nbytes
    est = FisherInverse.estimate_bytes(101, gradients=4, block_size=None, algorithm="mfac")
    assert est == 101 * 4 * 8


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_params=0, gradients=4, damping=1.0), "num_params must be a positive integer"),
        (dict(num_params=5, gradients=0, damping=1.0), "gradients must be a positive integer"),
        (dict(num_params=5, gradients=4, damping=0.0), "damping must be > 0"),
        (dict(num_params=5, gradients=4, damping=-1e-3), "damping must be > 0"),
        (
            dict(num_params=5, gradients=4, damping=float("nan")),
            "damping must be a positive finite",
        ),
        (
            dict(num_params=5, gradients=4, damping=1.0, block_size=0),
            "block_size must be a positive",
        ),
        (dict(num_params=5, gradients=4, damping=1.0, algorithm="lu"), "algorithm must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    d = kwargs.pop("num_params")
    with pytest.raises(ValueError, match=message):
        FisherInverse(d, **kwargs)


@pytest.mark.parametrize("algorithm", ALGS)
def test_bad_gradients_rejected_without_poisoning(algorithm):
    grads = make_grads(4, 9, seed=7)
    f = build(grads[:2], 1e-3, 4, algorithm, gradients=4)
    before = f.blocks().clone()
    with pytest.raises(ValueError, match="g has length 8, expected 9"):
        f.add_grad(torch.zeros(8))
    bad = grads[2].clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        f.add_grad(bad)
    inf = grads[2:4].clone()
    inf[1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        f.add_grad(inf)
    assert torch.equal(f.blocks(), before) and f.num_seen == 2
    f.add_grad(grads[2:4])
    with pytest.raises(ValueError, match="more than gradients=4"):
        f.add_grad(grads[0])
    ref = fisher_inverse(grads, 1e-3, 4, 4)
    assert rel_err(f.diag(), ref.diagonal()) < 1e-11
    with pytest.raises(ValueError, match="x has length 3, expected 9"):
        f.mul(torch.ones(3))


@pytest.mark.parametrize("block", [None, 5])
@pytest.mark.parametrize("chunk", [8, 1 << 18])
def test_mfac_product_with_float32_storage_widens_a_slice_at_a_time(monkeypatch, block, chunk):
    """With float32 storage the product is computed in float64 a slice of W at a time (both the
    one-pass and the two-pass branch): the same numbers as widening the whole W at once."""
    import curvature.core.fisher as fisher_module

    monkeypatch.setattr(fisher_module, "WIDEN_CHUNK", chunk)
    grads = make_grads(12, 37, scale=3.0, seed=4)
    f = FisherInverse(37, gradients=12, damping=1e-3, block_size=block, algorithm="mfac",
                      dtype=torch.float32)  # fmt: skip
    f.add_grad(grads)
    x = torch.randn(3, 37, dtype=torch.float64)
    w = f._w.to(torch.float64)
    xs = f._split(x)
    coef = torch.einsum("inb,knb->kni", w, xs)
    whole = ((xs - torch.einsum("kni,inb->knb", coef, w)) / f.damping).reshape(3, -1)[:, :37]
    # the slices sum in another order: round-off of eps64 x |x| / damping, the product's scale
    torch.testing.assert_close(f.mul(x), whole, rtol=0, atol=1e-12 / f.damping)
