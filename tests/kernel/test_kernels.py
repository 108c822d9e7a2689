"""Every Triton kernel equals its torch reference (and the references equal dense math).

On this CPU-only machine the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py before the kernels are decorated); with a CUDA device the same tests run on the GPU
(marker ``gpu``). Shapes are small because the interpreter is slow: few programs, odd sizes.
"""

import os

import pytest
import torch

from curvature import kernels
from curvature.kernels import adahessian, mkor, obs, woodbury
from curvature.kernels._triton import jit, offset64, tl

F64 = torch.float64
pytestmark = pytest.mark.skipif(not kernels.TRITON_AVAILABLE, reason="Triton is not installed")

DEVICES = [
    pytest.param(
        "cpu",
        marks=[
            pytest.mark.interpreter,
            pytest.mark.skipif(
                os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"
            ),
        ],
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def spd_inverse(n, b, *, damp=1e-2, rank=None, seed=0, dtype=F64):
    """``n`` inverses of ``damp I + X X^T / b`` (nearly low-rank when ``rank`` is small)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, b, rank or b, generator=gen, dtype=F64)
    f = damp * torch.eye(b, dtype=F64) + x @ x.transpose(1, 2) / b
    return torch.linalg.inv(f).to(dtype)


# ------------------------------------------------------------------ Woodbury
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bsz", [1, 3, 50, 64])
@pytest.mark.parametrize(
    "dtype,grad_dtype",
    [(F64, F64), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)],
)
def test_woodbury_kernel_equals_reference_and_dense(device, bsz, dtype, grad_dtype):
    n, k, m, damp = 3, 5, 16, 1e-3
    gen = torch.Generator().manual_seed(bsz)
    grads = (torch.randn(k, n, bsz, generator=gen, dtype=F64) * 10.0).to(grad_dtype)
    blocks = torch.eye(bsz, dtype=F64).repeat(n, 1, 1) / damp
    ref = blocks.clone()
    woodbury.reference(ref, grads, m)
    out = blocks.to(dtype).to(device)
    woodbury.launch(out, grads.to(device), m)
    out = out.cpu().to(F64)
    # storage rounding of the starting inverse (1/damp) cancels as the Fisher fills up: the
    # error is bounded by a few eps of the storage dtype times 1/damp (the precision policy)
    eps = torch.finfo(dtype).eps
    assert (out - ref).abs().max() < 50 * eps / damp
    # and the reference is the dense inverse of the damped Fisher
    g = grads.to(F64)
    dense = damp * torch.eye(bsz, dtype=F64) + torch.einsum("knb,knc->nbc", g, g) / m
    torch.testing.assert_close(ref, torch.linalg.inv(dense), rtol=1e-8, atol=1e-10 / damp)


@pytest.mark.parametrize("device", DEVICES)
def test_woodbury_kernel_hard_cases(device):
    # tiny and huge gradients, a zero gradient, tiny damping and nearly low-rank history
    n, bsz, m = 4, 12, 8
    blocks = spd_inverse(n, bsz, damp=1e-6, rank=2)
    grads = torch.randn(6, n, bsz, dtype=F64)
    grads[0] *= 1e-6
    grads[1] *= 1e4
    grads[2] = 0.0
    ref = blocks.clone()
    woodbury.reference(ref, grads, m)
    out = blocks.clone().to(device)
    woodbury.launch(out, grads.to(device), m)
    scale = ref.abs().amax(dim=(1, 2), keepdim=True)
    assert ((out.cpu() - ref).abs() / scale).max() < 1e-8


def _diag_error(blocks, dense_inv):
    d = torch.diagonal(blocks.cpu().to(F64), dim1=1, dim2=2)
    ref = torch.diagonal(dense_inv, dim1=1, dim2=2)
    return ((d - ref).abs() / ref.abs()).max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_woodbury_float32_blocks_meet_the_float64_error_bound(device):
    """Float32 storage, damp 1e-7, gradient norms from 1e-3 to 1e2, full-rank history.

    The kernel accumulates in float64, so its diag(F^-1) error is that of the reference with the
    same float32 storage; the tolerance is tight enough that normalising by m + 1 instead of m
    (1/17 for 1/16) fails, and so would float32 accumulation (0.75% on such inputs).
    """
    n, bsz, m, damp, batches = 3, 12, 16, 1e-7, 2
    gen = torch.Generator().manual_seed(3)
    norms = torch.logspace(-3, 2, m, dtype=F64)[torch.randperm(m, generator=gen)]
    g = torch.randn(m, n, bsz, generator=gen, dtype=F64)
    g = g / g.norm(dim=2, keepdim=True) * norms[:, None, None]
    dense = damp * torch.eye(bsz, dtype=F64) + torch.einsum("knb,knc->nbc", g, g) / m
    dense_inv = torch.linalg.inv(dense)

    def run(fn, num_grads, dev):
        blocks = (torch.eye(bsz, dtype=F64) / damp).repeat(n, 1, 1).to(torch.float32).to(dev)
        for chunk in g.chunk(batches):
            fn(blocks, chunk.to(torch.float32).to(dev), num_grads)
        return blocks

    ref_err = _diag_error(run(woodbury.reference, m, "cpu"), dense_inv)
    err = _diag_error(run(woodbury.launch, m, device), dense_inv)
    tol = max(2.0 * ref_err, 1e-4)
    assert err <= tol, (err, ref_err)
    assert _diag_error(run(woodbury.launch, m + 1, device), dense_inv) > 10 * tol


@pytest.mark.parametrize("device", DEVICES)
def test_woodbury_blocks_above_the_kernel_limit_take_the_reference(device, monkeypatch):
    monkeypatch.setenv("CURVATURE_KERNELS", "triton")
    blocks = torch.eye(woodbury.MAX_BLOCK + 1, dtype=F64).repeat(2, 1, 1).to(device)
    grads = torch.randn(3, 2, woodbury.MAX_BLOCK + 1, dtype=F64).to(device)
    assert not woodbury.supported(blocks, grads)
    ref = blocks.clone()
    woodbury.reference(ref, grads, 4)
    kernels.woodbury_update(blocks, grads, 4)
    torch.testing.assert_close(blocks, ref)
    with pytest.raises(ValueError, match="blocks up to 64"):
        woodbury.launch(blocks, grads, 4)


@jit
def _offset_probe(out_ptr, j, stride, WIDE: tl.constexpr):
    if WIDE:
        o = offset64(j, stride)
    else:
        o = j * stride
    tl.store(out_ptr + tl.arange(0, 1), tl.zeros((1,), dtype=tl.int64) + o)


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_offsets_past_two_to_the_31_are_computed_in_64_bits():
    """The offset helper the kernels use for ``j * stride``; the int32 product wraps (control)."""
    j, stride = 63, 85_000_000  # the 64th gradient of a BERT-base sized batch
    out = torch.zeros(1, dtype=torch.int64)
    _offset_probe[(1,)](out, j, stride, WIDE=True)
    assert out.item() == j * stride > 2**31
    _offset_probe[(1,)](out, j, stride, WIDE=False)
    assert out.item() != j * stride


# ------------------------------------------------------------------ OBS scores, N:M, update
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bsz,group", [(1, 1), (3, 1), (50, 1), (127, 1), (4, 4), (52, 4), (48, 2)])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_obs_scores_and_update_kernels_equal_reference(device, bsz, group, dtype):
    n = 3
    h = spd_inverse(n, bsz, damp=0.1, seed=bsz)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, bsz, generator=gen, dtype=F64)
    w[0, 0] = 0.0  # a zero weight scores zero
    pruned = (torch.rand(n, bsz // group, generator=gen) < 0.5).repeat_interleave(group, 1)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    scores, mask = obs.launch_scores(w.to(dtype).to(device), h.to(dtype).to(device), group)
    assert mask is None
    ref_scores = obs.reference_scores(w, h, group)
    torch.testing.assert_close(scores.cpu().to(F64), ref_scores, **tol)
    new = obs.launch_update(
        w.to(dtype).to(device), h.to(dtype).to(device), pruned.to(device), group
    )
    ref_new = obs.reference_update(w, h, pruned, group)
    torch.testing.assert_close(new.cpu().to(F64), ref_new, **tol)
    assert (new.cpu()[pruned] == 0).all()


def test_obs_references_equal_dense_math():
    n, bsz, group = 2, 8, 4
    h = spd_inverse(n, bsz, damp=0.5)
    w = torch.randn(n, bsz, dtype=F64)
    pruned = torch.zeros(n, bsz, dtype=torch.bool)
    pruned[:, 4:] = True
    scores = obs.reference_scores(w, h, group)
    new = obs.reference_update(w, h, pruned, group)
    for b in range(n):
        q = slice(4, 8)
        hq = h[b, q, q]
        z = torch.linalg.solve(hq, w[b, q])
        torch.testing.assert_close(scores[b, 1], 0.5 * w[b, q] @ z)
        expect = w[b] - h[b][:, q] @ z
        torch.testing.assert_close(new[b, :4], expect[:4])
        # single-group OBS lands the pruned group at exactly zero before the explicit zeroing
        torch.testing.assert_close(expect[4:], torch.zeros(4, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("bsz", [8, 24, 40])
def test_fused_nm_selection_equals_reference(device, nm, bsz):
    n = 3
    h = spd_inverse(n, bsz, damp=0.3, seed=7)
    w = torch.randn(n, bsz, dtype=F64)
    w[1, :4] = 0.5  # ties inside a run: broken toward the lower index
    h[1, :4, :4] = torch.eye(4, dtype=F64)
    scores, mask = obs.launch_scores(w.to(device), h.to(device), 1, nm)
    ref_scores = obs.reference_scores(w, h, 1)
    ref_mask = obs.reference_nm_select(ref_scores, *nm)
    torch.testing.assert_close(scores.cpu(), ref_scores)
    assert torch.equal(mask.cpu(), ref_mask)
    keep, m = nm
    assert (mask.view(n, -1, m).sum(-1) == m - keep).all()
    # the pruned ones are the lowest scores of each run
    runs, pr = ref_scores.view(-1, m), ref_mask.view(-1, m)
    assert (
        runs[pr].view(-1, m - keep).max(-1).values <= runs[~pr].view(-1, keep).min(-1).values
    ).all()


# ------------------------------------------------------------------ greedy OBS
def dense_greedy(w, h, valid, group, fixed=None, nm=None, steps=None):
    """Ground truth from the original inverse only: each step adds the group whose pruning (with
    the optimal correction of everything kept) raises ``L(S) = 1/2 w_S^T (H_SS)^-1 w_S`` least."""
    b = w.shape[0]
    ngroups = b // group
    groups = [list(range(q * group, (q + 1) * group)) for q in range(ngroups)]
    ok = [bool(valid[g].all()) for g in groups]
    fix = [fixed is not None and bool(fixed[g].all()) and ok[q] for q, g in enumerate(groups)]
    steps = steps if steps is not None else (b * (nm[1] - nm[0]) // nm[1] if nm else ngroups)

    def loss(sel):
        idx = [i for q in sel for i in groups[q]]
        if not idx:
            return 0.0
        ws = w[idx]
        return 0.5 * (ws @ torch.linalg.solve(h[idx][:, idx], ws)).item()

    chosen, order, cost = [], [], []
    for _ in range(steps):
        cands = {}
        for q in range(ngroups):
            if q in chosen or not ok[q]:
                continue
            if nm is not None:
                run = q // nm[1]
                if sum(1 for c in chosen if c // nm[1] == run) >= nm[1] - nm[0]:
                    continue
            cands[q] = -1.0 if fix[q] else max(0.0, loss(chosen + [q]) - loss(chosen))
        if not cands:
            order.append(-1)
            cost.append(float("inf"))
            continue
        best = min(cands.values())
        q = min(c for c, v in cands.items() if v == best)
        chosen.append(q)
        order.append(q)
        cost.append(best)
    return order, cost


GREEDY_CASES = [  # (block, group, nm, steps)
    (1, 1, None, None),
    (3, 1, None, None),
    (12, 1, None, None),
    (50, 1, None, 20),
    (64, 1, None, 9),
    (12, 4, None, None),
    (48, 2, None, 10),
    (64, 4, None, 6),
    (8, 1, (2, 4), None),
    (24, 1, (4, 8), None),
    (40, 1, (2, 4), None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bsz,group,nm,steps", GREEDY_CASES)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_greedy_kernel_equals_reference_and_dense(device, bsz, group, nm, steps, dtype):
    n = 3
    h = spd_inverse(n, bsz, damp=0.1, seed=bsz + group)
    gen = torch.Generator().manual_seed(bsz)
    w = torch.randn(n, bsz, generator=gen, dtype=F64)
    valid = torch.ones(n, bsz, dtype=torch.bool)
    fixed = torch.zeros(n, bsz, dtype=torch.bool)
    if bsz >= 8:
        valid[2, -group:] = False  # padding at the end of the last block
        fixed[1, :group] = True  # a group pruned in an earlier step
        w[1, :group] = 0.0
    w[0, -1] = 0.0  # an exact zero among real weights
    kw = dict(fixed=fixed, nm=nm, steps=steps)
    wd, hd = w.to(dtype), h.to(dtype)
    o_ref, c_ref = obs.reference_greedy(wd, hd, valid, group, **kw)
    o, c = obs.launch_greedy(wd.to(device), hd.to(device), valid.to(device), group, **kw)
    assert torch.equal(o.cpu(), o_ref)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c.cpu(), c_ref, **tol)
    if dtype == F64:  # the reference is the dense greedy of the original inverse
        for b in range(n):
            o_d, c_d = dense_greedy(w[b], h[b], valid[b], group, fixed[b], nm, steps)
            assert o_ref[b].tolist() == o_d
            torch.testing.assert_close(c_ref[b], torch.tensor(c_d, dtype=F64), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_kernel_hard_cases(device):
    """Tiny damping on a nearly low-rank history, huge and tiny weights, a block that runs out of
    eligible groups before the steps end (order -1, cost inf)."""
    n, bsz = 4, 16
    h = spd_inverse(n, bsz, damp=1e-6, rank=2, seed=5)
    w = torch.randn(n, bsz, dtype=F64)
    w[0] *= 1e-6
    w[1] *= 1e4
    valid = torch.ones(n, bsz, dtype=torch.bool)
    valid[3, 4:] = False  # only 4 eligible weights, 6 steps
    o_ref, c_ref = obs.reference_greedy(w, h, valid, 1, steps=6)
    o, c = obs.launch_greedy(w.to(device), h.to(device), valid.to(device), 1, steps=6)
    assert torch.equal(o.cpu(), o_ref)
    assert (o_ref[3, 4:] == -1).all() and torch.isinf(c_ref[3, 4:]).all()
    fin = torch.isfinite(c_ref)
    rel = (c.cpu()[fin] - c_ref[fin]).abs() / c_ref[fin].abs().clamp_min(1e-300)
    assert rel.max() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_kernel_and_reference_skip_a_degenerate_group_alike(device):
    """A group whose inverse diagonal is 0 and weight 0 scores 0/0 = NaN: never chosen by either
    path (the others are still pruned in order)."""
    h = spd_inverse(1, 4, damp=0.1, seed=2)
    w = torch.randn(1, 4, dtype=F64)
    h[0, 1, :] = 0.0
    h[0, :, 1] = 0.0
    w[0, 1] = 0.0
    valid = torch.ones(1, 4, dtype=torch.bool)
    o_ref, c_ref = obs.reference_greedy(w, h, valid, 1)
    o, c = obs.launch_greedy(w.to(device), h.to(device), valid.to(device), 1)
    assert torch.equal(o.cpu(), o_ref)
    assert sorted(o_ref[0, :3].tolist()) == [0, 2, 3] and o_ref[0, 3].item() == -1


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_dispatch_above_the_kernel_limit(device, monkeypatch):
    monkeypatch.setenv("CURVATURE_KERNELS", "triton")
    bsz = obs.GREEDY_MAX_BLOCK * 2
    h = spd_inverse(2, bsz, damp=0.1).to(device)
    w = torch.randn(2, bsz, dtype=F64).to(device)
    valid = torch.ones(2, bsz, dtype=torch.bool, device=device)
    assert not obs.greedy_supported(w, 1)
    o, c = kernels.obs_greedy(w, h, valid, 1, steps=3)
    o_ref, _ = obs.reference_greedy(w, h, valid, 1, steps=3)
    assert torch.equal(o, o_ref)
    with pytest.raises(ValueError, match="blocks up to 64"):
        obs.launch_greedy(w, h, valid, 1, steps=3)


# ------------------------------------------------------------------ AdaHessian
HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.01, hessian_power=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_length", [1, 3])
@pytest.mark.parametrize("refresh", [True, False])
@pytest.mark.parametrize(
    "edge", ["none", "zero-moments", "zero-grads", "power-0", "power-1", "power-0-zero-moments"]
)
def test_adahessian_group_kernel_equals_reference(device, block_length, refresh, edge):
    # one group with 1-D, 2-D, 3-D and 4-D parameters (two segment-length classes), odd sizes
    shapes = [(37,), (5, 11), (3, 4, 7), (4, 3, 3, 3), (2, 3, 1, 5), (1,)]
    gen = torch.Generator().manual_seed(block_length)
    ps = [torch.randn(s, generator=gen) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    ds = [torch.randn(s, generator=gen).abs() for s in shapes] if refresh else None
    ms = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=gen) for s in shapes]
    steps, hsteps = [3] * 6, [2] * 6
    hyper = dict(HYPER, block_length=block_length)
    if "zero-moments" in edge:  # a first step: nothing accumulated yet, and no estimate
        ms = [torch.zeros(s) for s in shapes]
        vs = [torch.zeros(s) for s in shapes]
        ds = None
    if edge == "zero-grads":
        gs = [torch.zeros(s) for s in shapes]
        ds = None if ds is None else [torch.zeros(s) for s in shapes]
    if edge.startswith("power-"):
        hyper["hessian_power"] = float(edge.split("-")[1])
    ref = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    adahessian.reference_group(ref[0], gs, ds, ref[1], ref[2], steps, hsteps, **hyper)
    out = [[t.clone().to(device) for t in ts] for ts in (ps, ms, vs)]
    dev = None if ds is None else [d.to(device) for d in ds]
    adahessian.launch_group(
        out[0], [g.to(device) for g in gs], dev, out[1], out[2], steps, hsteps, **hyper
    )
    for a_list, b_list in zip(out, ref):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


def test_adahessian_spatial_average_segments():
    d = torch.arange(10.0)
    torch.testing.assert_close(
        adahessian.spatial_average(d, 4),
        torch.tensor([1.5] * 4 + [5.5] * 4 + [8.5] * 2),  # the last run is shorter
    )
    d4 = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(
        adahessian.spatial_average(d4, 1), d4.mean((2, 3), keepdim=True).expand_as(d4)
    )


# ------------------------------------------------------------------ MKOR
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["factor", "inverse"])
def test_mkor_batched_rank1_equals_reference_and_dense(device, form):
    sizes = [1, 3, 50, 33, 65]  # different sizes in one launch, none a multiple of the tile
    decay = 0.9
    gen = torch.Generator().manual_seed(0)
    invs = [spd_inverse(1, s, damp=0.5, seed=s)[0] for s in sizes]
    vecs = [torch.randn(s, generator=gen, dtype=F64) * (100.0 if s == 33 else 1.0) for s in sizes]
    ref = [a.clone() for a in invs]
    mkor.reference(ref, vecs, decay, form)
    out = [a.clone().to(device) for a in invs]
    mkor.launch(out, [v.to(device) for v in vecs], decay, form, tile=16)
    for a, r, inv, u in zip(out, ref, invs, vecs):
        torch.testing.assert_close(a.cpu(), r, rtol=1e-10, atol=1e-12)
        if form == "factor":  # L <- decay L + (1 - decay) u u^T
            dense = decay * torch.linalg.inv(inv) + (1 - decay) * torch.outer(u, u)
        else:  # the MKOR code: (decay A + (1 - decay) I)^-1 + u u^T
            blend = decay * inv + (1 - decay) * torch.eye(len(u), dtype=F64)
            dense = torch.linalg.inv(blend) + torch.outer(u, u)
        torch.testing.assert_close(r, torch.linalg.inv(dense), rtol=1e-7, atol=1e-9)


def test_tile_table_gives_every_program_work():
    from curvature.kernels._triton import tile_table

    t = tile_table([3, 0, 1, 2], "cpu")
    assert t.tolist() == [[0, 0], [0, 1], [0, 2], [2, 0], [3, 0], [3, 1]]  # 6 programs, not 4 x 3


# ------------------------------------------------------------------ dispatch
def test_dispatch_chooses_once_and_respects_the_environment(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("CURVATURE_KERNELS", "auto")
    assert kernels.backend(x) == "torch"  # CPU tensors take the reference
    assert kernels.backend(x, supported=False) == "torch"
    monkeypatch.setenv("CURVATURE_KERNELS", "torch")
    assert kernels.backend(x) == "torch"
    monkeypatch.setenv("CURVATURE_KERNELS", "triton")
    assert kernels.backend(x) == "triton"
    monkeypatch.setenv("CURVATURE_KERNELS", "fast")
    with pytest.raises(ValueError, match="CURVATURE_KERNELS must be one of auto, torch, triton"):
        kernels.backend(x)


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_forced_triton_path_through_the_core(monkeypatch):
    """The core's Fisher and pruning calls give the same numbers through either backend."""
    from curvature import FisherInverse, KroneckerFactorInverse

    grads = torch.randn(6, 23)
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("CURVATURE_KERNELS", mode)
        f = FisherInverse(23, gradients=6, damping=1e-3, block_size=5, algorithm="woodbury")
        f.add_grad(grads)
        k = KroneckerFactorInverse(7, decay=0.8, damping=1.0)
        k.update(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)))
        w = torch.randn(5, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
        h = f.blocks().to(F64)
        s = kernels.obs_scores(w, h, 1)[0]
        results[mode] = (f.blocks().clone(), k.inverse.clone(), s)
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize(
    "kw",
    [
        dict(selection="greedy", mask="unstructured", sparsity=0.6),
        dict(selection="greedy", mask="block4", sparsity=0.5),
        dict(selection="greedy", mask="2:4"),
        dict(selection="independent", mask="4:8"),
    ],
    ids=["greedy", "greedy-block4", "greedy-2:4", "independent-4:8"],
)
def test_pruning_engine_gives_the_same_model_through_either_backend(monkeypatch, kw):
    """The engine's greedy OBS and its N:M selection run through the kernels (forced here, in the
    interpreter) and give the masks and weights of the torch path."""
    from models import correlated_inputs, prune_copy, trained_mlp

    x = correlated_inputs(n=128)
    model, y = trained_mlp(x, steps=50)
    kw = {"gradients": 16, "block_size": 16, "fisher_damping": 1e-6, "sparsity": 0.5, **kw}
    calls = {"greedy": 0, "nm": 0}
    real_greedy, real_scores = obs.launch_greedy, obs.launch_scores

    def count_greedy(*a, **k):
        calls["greedy"] += 1
        return real_greedy(*a, **k)

    def count_scores(*a, **k):
        calls["nm"] += a[3] is not None if len(a) > 3 else k.get("nm") is not None
        return real_scores(*a, **k)

    monkeypatch.setattr(obs, "launch_greedy", count_greedy)
    monkeypatch.setattr(obs, "launch_scores", count_scores)
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("CURVATURE_KERNELS", mode)
        pruned, report = prune_copy(model, x, y, batch_size=8, **kw)
        results[mode] = [p.detach().clone() for p in pruned.parameters()]
    assert calls["greedy" if kw["selection"] == "greedy" else "nm"] > 0  # the kernels did run
    for a, b in zip(results["torch"], results["triton"]):
        assert torch.equal(a == 0, b == 0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_optimizers_take_the_same_steps_through_either_backend(monkeypatch):
    from curvature.optim import MKOR, AdaHessian

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    finals = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("CURVATURE_KERNELS", mode)
        torch.manual_seed(0)
        a = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        b = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        oa = AdaHessian(a.parameters(), lr=0.05, weight_decay=0.01, seed=0, block_length=2)
        ob = MKOR(b, lr=0.05, inv_freq=1)
        for _ in range(3):
            for model, opt, graph in ((a, oa, True), (b, ob, False)):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward(create_graph=graph)
                opt.step()
        finals[mode] = [p.detach().clone() for p in [*a.parameters(), *b.parameters()]]
    for p, q in zip(finals["torch"], finals["triton"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
