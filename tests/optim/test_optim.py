"""Second-order optimizers against exact math, on standard problems, and the shared suite."""

import copy
import logging
import math

import pytest
import torch
from torch.func import hessian

from curvature.kernels.adahessian import spatial_average
from curvature.optim import LAMB, MFAC, MKOR, AdaHessian, build_optimizer

F64 = torch.float64


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        dtype
    )


def mlp_data(seed=0, n=64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=dtype)
    y = (x @ torch.randn(6, 3, generator=gen, dtype=dtype)).argmax(1)
    return x, y


def make(name, model, **kw):
    defaults = {
        "adahessian": dict(lr=0.1),
        "mfac": dict(lr=3e-2, gradients=8, damping=1e-2),
        "mkor": dict(lr=0.1, inv_freq=2),
        "mkor-h": dict(lr=0.1, inv_freq=2),
        "lamb": dict(lr=1e-2),
    }[name]
    return build_optimizer(name, model, **{**defaults, **kw})


def train(model, opt, x, y, steps, create_graph=False):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=create_graph)
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- AdaHessian
def test_adahessian_diagonal_converges_to_true_hessian_diagonal():
    model = mlp(dtype=F64)
    x, y = mlp_data(dtype=F64)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss_of(*ps):
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    true = [
        hessian(loss_of, argnums=i)(*params).reshape(p.numel(), p.numel()).diagonal()
        for i, p in enumerate(params)
    ]
    true = torch.cat(true).abs()  # the estimate is |diag H| (the reference takes |z * Hz|)
    errs = []
    for n in (4, 64, 1024):
        opt = AdaHessian(params, n_samples=n, seed=0)
        loss = loss_of(*params)
        loss.backward(create_graph=True)
        est = torch.cat([e.flatten() for e in opt._hessian_diag(params)])
        errs.append(((est - true).norm() / true.norm()).item())
        for p in params:
            p.grad = None
    # 256x the probes: ~16x smaller error expected; demand 8x
    assert errs[2] < errs[1] < errs[0] and errs[2] < errs[0] / 8 and errs[2] < 0.2


def test_adahessian_newton_step_on_diagonal_quadratic():
    h = torch.tensor([0.5, 2.0, 10.0, 100.0], dtype=F64)
    w = torch.nn.Parameter(torch.tensor([1.0, -3.0, 2.0, 0.5], dtype=F64))
    opt = AdaHessian([w], lr=1.0, betas=(0.0, 0.0), eps=0.0, hessian_power=1.0, seed=1)
    loss = 0.5 * (h * w**2).sum()
    loss.backward(create_graph=True)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.zeros(4, dtype=F64), atol=1e-12, rtol=0)
    # hessian_power = 0 is plain (bias-corrected) momentum SGD-like scaling: step = lr * g
    w2 = torch.nn.Parameter(torch.tensor([1.0, -3.0, 2.0, 0.5], dtype=F64))
    opt2 = AdaHessian([w2], lr=0.01, betas=(0.0, 0.0), eps=0.0, hessian_power=0.0)
    (0.5 * (h * w2**2).sum()).backward(create_graph=True)
    opt2.step()
    torch.testing.assert_close(
        w2.detach(), torch.tensor([1.0, -3.0, 2.0, 0.5], dtype=F64) * (1 - 0.01 * h)
    )


def test_adahessian_closure_form_matches_backward_form_and_frees_graph():
    x, y = mlp_data()
    a, b = mlp(), mlp()
    oa, ob = (
        AdaHessian(a.parameters(), lr=0.05, seed=3),
        AdaHessian(b.parameters(), lr=0.05, seed=3),
    )
    train(a, oa, x, y, 5, create_graph=True)
    for _ in range(5):
        ob.zero_grad()
        ob.step(lambda: torch.nn.functional.cross_entropy(b(x), y))  # the optimizer differentiates
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
        assert pa.grad.grad_fn is None  # the graph was released after the step


def test_adahessian_clear_error_without_create_graph():
    model = mlp()
    x, y = mlp_data()
    opt = AdaHessian(model.parameters())
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="create_graph=True.*attn_implementation='eager'"):
        opt.step()


def test_adahessian_update_each_and_rng_untouched():
    x, y = mlp_data()
    model = mlp()
    opt = AdaHessian(model.parameters(), lr=0.05, update_each=3, seed=0)
    state = torch.get_rng_state()
    train(model, opt, x, y, 7, create_graph=True)
    assert torch.equal(state, torch.get_rng_state())
    st = opt.state[next(model.parameters())]
    assert st["step"] == 7 and st["hessian_step"] == 3  # refreshed at steps 0, 3, 6


def test_spatial_averaging_shapes():
    d4 = torch.arange(2 * 3 * 2 * 2, dtype=F64).view(2, 3, 2, 2)
    assert torch.equal(spatial_average(d4, 1), d4.mean((2, 3), keepdim=True).expand_as(d4))
    d3 = torch.arange(12, dtype=F64).view(2, 2, 3)
    assert torch.equal(spatial_average(d3, 1), d3.mean(2, keepdim=True).expand_as(d3))
    d2 = torch.arange(10, dtype=F64).view(2, 5)
    out = spatial_average(d2, 2)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.5, 2.5, 2.5, 4.0], dtype=F64))
    d1 = torch.arange(3, dtype=F64)
    assert torch.equal(spatial_average(d1, 1), d1)


def test_adahessian_trains_conv1d_and_conv2d():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(4 * 6, 2)
    )
    x, y = torch.randn(16, 2, 8), torch.randint(0, 2, (16,))
    losses = train(
        model, AdaHessian(model.parameters(), lr=0.05, seed=0), x, y, 30, create_graph=True
    )
    assert losses[-1] < losses[0]
    conv2 = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 2)
    )
    x2 = torch.randn(8, 1, 6, 6)
    losses = train(
        conv2, AdaHessian(conv2.parameters(), lr=0.05, seed=0), x2, y[:8], 30, create_graph=True
    )
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- standard problems
def rosenbrock(p):
    return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def beale(p):
    x, y = p[0], p[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


@pytest.mark.parametrize(
    "fn,start,target,kw",
    [
        # the banana valley: AdaHessian walks it slowly; demand it is well into the valley
        (rosenbrock, [-1.5, 2.0], [1.0, 1.0], dict(lr=0.5, betas=(0.9, 0.9), eps=1e-8)),
        (beale, [1.0, 1.0], [3.0, 0.5], dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8)),
    ],
)
def test_adahessian_converges_on_test_functions(fn, start, target, kw):
    p = torch.nn.Parameter(torch.tensor(start, dtype=F64))
    opt = AdaHessian([p], seed=0, **kw)
    for _ in range(3000):
        opt.zero_grad()
        opt.step(lambda: fn(p))
    start_loss = fn(torch.tensor(start, dtype=F64)).item()
    assert fn(p.detach()).item() < 5e-3 * start_loss
    assert (p.detach() - torch.tensor(target, dtype=F64)).norm() < 0.5 * (
        torch.tensor(start, dtype=F64) - torch.tensor(target, dtype=F64)
    ).norm()


@pytest.mark.parametrize(
    "fn,start,target", [(rosenbrock, [-1.5, 2.0], [1.0, 1.0]), (beale, [1.0, 1.0], [3.0, 0.5])]
)
def test_mfac_converges_on_test_functions(fn, start, target):
    p = torch.nn.Parameter(torch.tensor(start, dtype=F64))
    # momentum is an average (b = mu b + (1 - mu) u): 10x the rate of a heavy-ball sum
    opt = MFAC([p], lr=2e-2, gradients=4, damping=1e-3, momentum=0.9, fisher_dtype=F64)
    best = float("inf")
    for _ in range(4000):
        opt.zero_grad()
        loss = opt.step(lambda: (fn(p).backward(), fn(p))[1])
        best = min(best, loss.item())
    assert best < 1e-3


@pytest.mark.parametrize("name", ["adahessian", "mfac", "mkor", "mkor-h", "lamb"])
def test_small_mlp_trains(name):
    x, y = mlp_data()
    model = mlp()
    losses = train(model, make(name, model), x, y, 60, create_graph=name == "adahessian")
    assert losses[-1] < 0.6 * losses[0]


# ---------------------------------------------------------------- M-FAC exact math
def test_mfac_direction_equals_dense_damped_fisher_solve():
    x, y = mlp_data(dtype=F64)
    model = mlp(dtype=F64)
    lr, damp, m = 0.1, 1e-3, 5
    opt = MFAC(model.parameters(), lr=lr, gradients=m, damping=damp, fisher_dtype=F64)
    history = []
    for step in range(8):
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt.zero_grad()
        xb, yb = x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8]
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        history.append(g.clone())
        opt.step()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        window = torch.stack(history[-m:])  # the missing rows of a warm-up window are zeros
        fisher = damp * torch.eye(g.numel(), dtype=F64) + window.T @ window / m
        torch.testing.assert_close(
            (before - after) / lr, torch.linalg.solve(fisher, g), rtol=1e-7, atol=1e-9
        )


def test_mfac_with_huge_damping_is_scaled_sgd():
    x, y = mlp_data(dtype=F64)
    a, b = mlp(dtype=F64), mlp(dtype=F64)
    damp = 1e8
    oa = MFAC(
        a.parameters(),
        lr=0.1 * damp,
        gradients=4,
        damping=damp,
        momentum=0.9,
        weight_decay=1e-3,
        fisher_dtype=F64,
    )
    # M-FAC's momentum is an average from zero: SGD with dampening 0.9 after its first step
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    for p in b.parameters():  # torch's SGD starts its buffer at the gradient, not at zero
        ob.state[p]["momentum_buffer"] = torch.zeros_like(p)
    train(a, oa, x, y, 10)
    train(b, ob, x, y, 10)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- MKOR exact math
def test_mkor_factor_inverses_equal_dense_inverses():
    x, y = mlp_data(dtype=F64)
    model = mlp(dtype=F64)
    decay, damp = 0.9, 0.5
    opt = MKOR(
        model, lr=0.01, decay=decay, damping=damp, inv_freq=1, stability_threshold=1e12,
        factor_update="factor",
    )  # fmt: skip
    layer = opt.layers[0]
    left = damp * torch.eye(7, dtype=F64)
    right = damp * torch.eye(8, dtype=F64)
    for step in range(6):
        opt.zero_grad()
        xb, yb = x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8]
        out = model(xb)
        torch.nn.functional.cross_entropy(out, yb).backward()
        a = torch.cat([xb.mean(0), torch.ones(1, dtype=F64)])
        assert torch.allclose(layer.a, a)
        g = layer.g
        opt.step()
        left = decay * left + (1 - decay) * torch.outer(a, a)
        right = decay * right + (1 - decay) * torch.outer(g, g)
        torch.testing.assert_close(layer.left.inverse, torch.linalg.inv(left), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            layer.right.inverse, torch.linalg.inv(right), rtol=1e-9, atol=1e-9
        )


def test_mkor_conv2d_factors_and_preconditioned_gradient():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=F64)
    model = torch.nn.Sequential(
        conv, torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(27, 4, dtype=F64)
    )
    decay, damp = 0.8, 0.3
    opt = MKOR(
        model, lr=0.0, decay=decay, damping=damp, inv_freq=1, stability_threshold=1e12,
        factor_update="factor",
    )  # fmt: skip
    layer = opt.layers[0]
    assert layer.name == "0" and layer.conv
    left = damp * torch.eye(2 * 9 + 1, dtype=F64)
    right = damp * torch.eye(3, dtype=F64)
    for _ in range(3):
        x = torch.randn(5, 2, 5, 5, dtype=F64)
        opt.zero_grad()
        out = model(x)
        torch.nn.functional.cross_entropy(out, torch.arange(5) % 4).backward()
        patches = torch.nn.functional.unfold(x, 3, padding=1, stride=2)  # [5, 18, 9]
        a = torch.cat([patches.mean((0, 2)), torch.ones(1, dtype=F64)])
        torch.testing.assert_close(layer.a, a)
        g = layer.g
        # the per-sample output gradient (position mean) summed over the batch: the bias
        # gradient / positions
        torch.testing.assert_close(g, conv.bias.grad / 9)
        grad = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], dim=1)
        left = decay * left + (1 - decay) * torch.outer(a, a)
        right = decay * right + (1 - decay) * torch.outer(g, g)
        opt.step()
        u = torch.linalg.solve(right, grad) @ torch.linalg.inv(left)
        # rescaled by the summed norms of the weight and bias parts
        gn = grad[:, :-1].norm() + grad[:, -1].norm()
        u = u * gn / (u[:, :-1].norm() + u[:, -1].norm())
        torch.testing.assert_close(conv.weight.grad.reshape(3, -1), u[:, :-1])
        torch.testing.assert_close(conv.bias.grad, u[:, -1])
    # depthwise / grouped convolutions are left to the base optimizer
    dw = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=4), torch.nn.Conv2d(4, 2, 1))
    assert [l.name for l in MKOR(dw, lr=0.1).layers] == ["1"]


@pytest.mark.parametrize("base", ["sgd", "adamw", "lamb"])
def test_mkor_with_identity_factors_equals_base_optimizer(base, monkeypatch):
    from curvature.core.kronecker import KroneckerFactorInverse

    # factors stay I/damp
    monkeypatch.setattr(KroneckerFactorInverse, "update_many", staticmethod(lambda f, v: None))
    x, y = mlp_data()
    a, b = mlp(), mlp()
    oa = MKOR(a, lr=0.05, base_optimizer=base, damping=1.0)
    ob = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.0),
        "lamb": lambda p: LAMB(p, lr=0.05, eps=1e-8),
    }[base](b.parameters())
    train(a, oa, x, y, 8)
    train(b, ob, x, y, 8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_mkor_stabiliser_blends_not_resets():
    model = mlp()
    opt = MKOR(
        model, lr=0.01, damping=1.0, decay=0.5, stability_threshold=10.0, stability_blend=0.5
    )
    f = opt.layers[1].right
    f.inverse = torch.diag(torch.tensor([100.0, 1.0, 1.0], dtype=F64))  # blew up in one direction
    opt._stabilise(f)
    # L = diag(0.01, 1, 1) blended halfway to I: diag(0.505, 1, 1) -> inverse diag(1.98, 1, 1)
    torch.testing.assert_close(f.inverse.diagonal(), torch.tensor([1 / 0.505, 1.0, 1.0], dtype=F64))
    assert opt.stabilised == 1


def test_mkor_h_switches_when_acceleration_stops(caplog):
    model = mlp()
    opt = MKOR(model, lr=0.01, hybrid=True, switch_window=5, switch_ratio=0.5, switch_patience=2)
    losses = [2.0 - 0.1 * i for i in range(15)] + [0.5 - 0.001 * i for i in range(30)]
    with caplog.at_level(logging.INFO, logger="curvature.optim.mkor"):
        for i, loss in enumerate(losses):
            opt.steps = i
            opt.observe_loss(loss)
    assert opt.switched_at_step is not None and 20 <= opt.switched_at_step <= 35
    assert "MKOR-H: switching to sgd" in caplog.text
    assert all(not layer.module._forward_hooks for layer in opt.layers)  # hooks removed


def test_mkor_h_switch_rule_exactly():
    """The documented rule, step by step: window means 10, 8, 6, 5.5, 3.5, 3.0, 2.8 (rates 2, 2,
    0.5, 2, 0.5, 0.2 per window against a best of 2 and a ratio of 0.5): the slow window at rate
    0.5 is followed by a fast one, so the patience count resets; the switch comes at the end of
    the second slow window in a row, the 35th loss. Non-finite losses are ignored."""
    model = mlp()
    opt = MKOR(model, lr=0.01, momentum=0.0, hybrid=True, switch_window=5, switch_ratio=0.5,
               switch_patience=2)  # fmt: skip
    means = [10.0, 8.0, 6.0, 5.5, 3.5, 3.0, 2.8, 2.7]
    losses = [m for m in means for _ in range(5)]
    losses.insert(3, float("nan"))
    seen = 0
    for value in losses:
        if math.isfinite(value):
            seen += 1
        opt.steps = seen - 1
        opt.observe_loss(torch.tensor(value))
        if seen < 35:
            assert opt.switched_at_step is None, seen
    assert opt.switched_at_step == 34
    # after the switch a step is the base optimizer's alone (SGD without momentum: -lr * grad)
    x, y = mlp_data()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.01 * g)
    # the switch survives a state_dict round trip
    twin = MKOR(mlp(), lr=0.01, momentum=0.0, hybrid=True)
    twin.load_state_dict(opt.state_dict())
    assert twin.switched_at_step == 34
    assert all(not layer.module._forward_hooks for layer in twin.layers)  # hooks removed


def test_mkor_statistics_never_leak_into_a_later_step():
    """A forward/backward that no step consumed (before the first step, or a step skipped by a
    gradient scaler) is dropped by zero_grad; after load_state_dict the next step records if it
    updates the factors."""
    x, y = mlp_data()
    model = mlp()
    opt = MKOR(model, lr=0.05, momentum=0.0, inv_freq=2)
    torch.nn.functional.cross_entropy(model(3 * x), y).backward()  # never stepped
    opt.zero_grad()
    assert all(layer.a is None and layer.g is None for layer in opt.layers)
    twin_model = mlp()
    twin = MKOR(twin_model, lr=0.05, momentum=0.0, inv_freq=2)
    for o, m in ((opt, model), (twin, twin_model)):
        for _ in range(3):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # state at step 3 (not a factor step): a fresh optimizer loading it records at step 4
    fresh_model = mlp()
    fresh_model.load_state_dict(model.state_dict())
    fresh = MKOR(fresh_model, lr=0.05, momentum=0.0, inv_freq=2)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.steps == 3 and not any(layer.record for layer in fresh.layers)
    fresh.zero_grad()
    torch.nn.functional.cross_entropy(fresh_model(x), y).backward()
    fresh.step()
    assert all(layer.record for layer in fresh.layers)  # step 4 updates the factors


def test_mkor_excludes_layers_and_needs_model():
    model = mlp()
    opt = MKOR(model, lr=0.1, exclude=["re:2"])
    assert [l.name for l in opt.layers] == ["0"]
    with pytest.raises(TypeError, match="MKOR takes the model"):
        MKOR(list(model.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer must be one of"):
        MKOR(model, lr=0.1, base_optimizer="rmsprop")


# ---------------------------------------------------------------- shared suite
@pytest.mark.parametrize("name", ["adahessian", "mfac", "mkor", "mkor-h", "lamb"])
def test_state_dict_round_trip_is_exact(name):
    x, y = mlp_data()
    cg = name == "adahessian"
    kw = {"seed": 0} if cg else {}
    straight = mlp()
    opt = make(name, straight, **kw)
    train(straight, opt, x, y, 20, create_graph=cg)

    first = mlp()
    opt1 = make(name, first, **kw)
    train(first, opt1, x, y, 10, create_graph=cg)
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(opt1.state_dict())
    resumed = mlp(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = make(name, resumed, **kw)
    opt2.load_state_dict(saved_opt)
    if cg:  # the probe stream continues where it was (the generator is part of the run)
        opt2._generators = copy.deepcopy(opt1._generators)
    train(resumed, opt2, x, y, 10, create_graph=cg)
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adahessian", "mfac", "mkor", "lamb"])
def test_param_groups_dtype_and_no_state_growth(name):
    x, y = mlp_data(dtype=F64)
    model = mlp(dtype=F64)
    opt = make(name, model)
    opt.param_groups[0]["lr"] *= 0.5  # param groups are live (schedulers rely on it)
    train(model, opt, x, y, 3, create_graph=name == "adahessian")
    size = len(str(opt.state_dict().keys())), len(opt.state)
    train(model, opt, x, y, 3, create_graph=name == "adahessian")
    assert (len(str(opt.state_dict().keys())), len(opt.state)) == size
    assert all(p.dtype == F64 for p in model.parameters())


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda ps: AdaHessian(ps, betas=(1.0, 0.9)), r"betas\[0\] must be in \[0, 1\)"),
        (lambda ps: AdaHessian(ps, hessian_power=2.0), r"hessian_power must be in \[0, 1\]"),
        (lambda ps: AdaHessian(ps, update_each=0), "update_each must be an integer >= 1"),
        (lambda ps: AdaHessian(ps, distribution="uniform"), "distribution must be one of"),
        (lambda ps: AdaHessian(ps, lr=-1), "lr must be a finite number >= 0"),
        (lambda ps: MFAC(ps, lr=0.1, damping=0), "damping must be > 0"),
        (lambda ps: MFAC(ps, lr=0.1, gradients=0), "gradients must be an integer >= 1"),
        (lambda ps: MFAC(ps, lr=0.1, momentum=1.0), r"momentum must be in \[0, 1\)"),
        (lambda ps: LAMB(ps, betas=(0.9,)), "betas must be a pair"),
    ],
)
def test_validation_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call(mlp().parameters())
    AdaHessian(mlp().parameters(), betas=(0.0, 0.0))  # betas anywhere in [0, 1), as in torch


def test_build_optimizer_errors():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("shampoo", mlp(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer mfac: .*unexpected keyword"):
        build_optimizer("mfac", mlp(), lr=0.1, bogus=1)


def test_mfac_refuses_a_window_that_cannot_fit():
    big = torch.nn.Parameter(torch.zeros(1_000_000))
    with pytest.raises(MemoryError, match="lower gradients"):
        MFAC([big], lr=1e-3, gradients=10**7)  # 40 TB of window


def test_mkor_releases_its_hooks_on_close_exit_and_garbage_collection():
    import gc

    def hooks(model):
        return sum(len(m._forward_hooks) for m in model.modules())

    model = mlp()
    opt = MKOR(model, lr=0.01)
    assert hooks(model) == 2
    opt.close()
    assert hooks(model) == 0
    with MKOR(model, lr=0.01) as opt:
        assert hooks(model) == 2
    assert hooks(model) == 0
    opt = MKOR(model, lr=0.01)
    del opt
    gc.collect()
    assert hooks(model) == 0


def test_mkor_plans_its_factor_memory():
    """A head tied to the input embeddings is left to the base optimizer (its factor is the
    vocabulary squared: 9.7 GB for SmolLM2, which killed the process), so are the largest layers
    while the factors exceed max_memory, each said in one warning; nothing fitting is one line."""
    from models import tiny_llama_config
    from transformers import LlamaForCausalLM

    from curvature.optim.mkor import factor_bytes

    model = LlamaForCausalLM(tiny_llama_config(50, tie_word_embeddings=True))
    with pytest.warns(UserWarning, match=r"lm_head \(tied to the input embeddings\)"):
        opt = MKOR(model, lr=0.01)
    names = [layer.name for layer in opt.layers]
    assert "lm_head" not in names and len(names) == 14  # 7 linear layers in each of 2 blocks
    opt.close()
    modules = dict(model.named_modules())
    sizes = {n: factor_bytes(modules[n]) for n in names}
    budget = sum(sizes.values()) - 1  # one byte short: the largest layer goes
    with pytest.warns(UserWarning, match="exceed the budget"):
        opt = MKOR(model, lr=0.01, max_memory=budget)
    largest = max(sizes, key=sizes.get)
    assert largest not in [layer.name for layer in opt.layers] and len(opt.layers) == 13
    opt.close()
    with pytest.raises(MemoryError, match="no layer's factors fit in max_memory"):
        MKOR(model, lr=0.01, max_memory=min(sizes.values()) - 1)


def test_adahessian_sub_batch_estimate_is_the_sub_batch_hessian_and_the_step_the_full_gradient():
    """``hessian_batch=0.25``: with the same probe, the estimate is ``|z * H_sub z|`` of the
    dense float64 Hessian of the first quarter's loss, and the step uses the whole batch's
    gradient (an optimizer fed both by hand: same parameters after the step)."""
    model, twin = mlp(dtype=F64), mlp(dtype=F64)
    twin.load_state_dict(model.state_dict())
    x, y = mlp_data(dtype=F64)
    n = x.shape[0] // 4
    params = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]

    def loss_of(*ps, rows=slice(None)):
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x[rows],))
        return torch.nn.functional.cross_entropy(out, y[rows])

    opt = AdaHessian(params, lr=0.1, seed=0, hessian_batch=0.25)
    assert opt.needs_hessian_closure and not opt.refreshes_next_step  # a plain backward
    loss_of(*params).backward()
    opt.set_hessian_closure(lambda: loss_of(*params, rows=slice(0, n)))
    probes = []
    real_probe = opt._probe
    opt._probe = lambda p: probes.append(real_probe(p)) or probes[-1]
    hand = [p.detach().clone() for p in params]
    grads = [p.grad.detach().clone() for p in params]
    opt.step()
    sizes = [p.numel() for p in params]

    def flat_loss(v):  # H z couples every parameter: the Hessian of all of them at once
        ps = [c.reshape(p.shape) for c, p in zip(v.split(sizes), params)]
        return loss_of(*ps, rows=slice(0, n))

    h = hessian(flat_loss)(torch.cat([t.flatten() for t in hand]))
    z = torch.cat([t.flatten() for t in probes])
    want = (z * (h @ z)).abs().split(sizes)
    for p, w in zip(params, want):
        torch.testing.assert_close(
            opt.state[p]["hessian_diag"], w.reshape(p.shape), rtol=1e-10, atol=1e-12
        )
    # the same update from the full-batch gradient and that estimate, through the normal path
    ref = AdaHessian(list(twin.parameters()), lr=0.1, seed=0)
    for q, g in zip(twin.parameters(), grads):
        q.grad = g
    ref._hessian_diag = lambda ps, absolute=True: [opt.state[p]["hessian_diag"] for p in params]
    ref.step()
    for p, q in zip(params, twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


def test_adahessian_sub_batch_without_its_loss_is_one_clear_error():
    model = mlp()
    x, y = mlp_data()
    opt = AdaHessian(model.parameters(), hessian_batch=0.5)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"hessian_batch=0.5.*set_hessian_closure"):
        opt.step()
    with pytest.raises(ValueError, match="hessian_batch"):
        AdaHessian(model.parameters(), hessian_batch=0.0)
