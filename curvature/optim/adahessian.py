r"""AdaHessian: Adam with the Hessian diagonal (Hutchinson) in place of the squared gradient.

Update rule, per parameter, with ``D_t`` the spatially averaged absolute Hutchinson estimate
``|mean_s (z_s * H z_s)|`` over ``n_samples`` probes (refreshed every ``update_each`` steps; the
absolute value is taken before the spatial average, as the authors' code does):

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) D_t^2,

    p_t = p_{t-1} - \mathrm{lr}\Big(\frac{m_t / (1-\beta_1^t)}{(\sqrt{v_t/(1-\beta_2^{k})})^{\kappa} + \epsilon}
          + \mathrm{wd}\cdot p_{t-1}\Big)

with ``k = t`` the step count and ``kappa = hessian_power``. With ``update_each > 1`` the last
estimate is folded into ``v`` at every step between refreshes and the bias correction counts steps
(the rule of the port the authors link, the only reference with ``update_each``). Spatial
averaging: 4-D (Conv2d) over the kernel's spatial dims, 3-D (Conv1d) over the last dim (the
authors' general version), 1-D and 2-D over consecutive blocks of ``block_length`` along the last
dim (1: none, the authors' vision default; the reference's blocks run over the flattened tensor,
the same whenever ``block_length`` divides the row length). ``tests/optim/test_optim_fidelity.py``
checks 20 steps against a dense float64 transcription of the reference on an MLP and a conv net.

With ``n_samples > 1`` the probes are averaged before the absolute value (an estimate of
``|diag H|``; averaging ``|z * Hz|`` instead would keep the off-diagonal noise). With one probe
(the reference) the two agree.

Deviations from the reference code, each a defect users hit there: 3-D weights are averaged,
not a crash (the vision version has no 3-D branch and reuses the previous parameter's estimate);
probes come from a private generator when ``seed`` is given (the global RNG is never touched); in
data-parallel runs the estimate is averaged across ranks (the reference sums the probes across
ranks, mapping 0 to +1, which biases them with an even world size, and averages a temporary);
and after each step the gradient graph is released (``p.grad`` detached) so that
``backward(create_graph=True)`` does not leak.

Two calling forms:

- ``loss.backward(create_graph=True); optimizer.step()``
- ``optimizer.step(closure)`` where ``closure`` returns the loss (it may call
  ``loss.backward(create_graph=True)`` itself; if it does not, the optimizer differentiates).

A third form makes a refresh cheaper: ``hessian_batch=f < 1`` estimates the Hessian diagonal on
the first ``f`` of each batch, not the whole of it. The gradient then comes from a plain
``loss.backward()`` on the whole batch (no ``create_graph``), and before each refreshing step the
caller hands the optimizer the loss of the sub-batch with ``set_hessian_closure(fn)``; the step
differentiates it twice (gradient with ``create_graph``, then the Hessian-vector products). A
refresh then costs a plain step plus ``f`` of the double-backward one: on MiniLM
``docs/bench-optim.md`` measures the step cost and the effect on accuracy. ``RecipeTrainer``
and ``curvature train`` (``--opt hessian_batch=0.25``) hand over the sub-batch themselves. With
``f = 1`` (the default) nothing changes: the reference's estimate on the whole batch.

Attention kernels without a double backward (SDPA, flash) fail in the Hessian-vector product;
load Hugging Face models with ``attn_implementation="eager"``.

References:
    Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "ADAHESSIAN: An Adaptive Second Order
    Optimizer for Machine Learning", AAAI 2021.

Example:
    >>> import torch
    >>> from curvature.optim import AdaHessian
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = AdaHessian([w], lr=1.0, betas=(0.0, 0.0), eps=0.0)
    >>> loss = (torch.tensor([1.0, 4.0]) * w**2).sum() / 2
    >>> loss.backward(create_graph=True)
    >>> opt.step()  # a Newton step on a diagonal quadratic lands on the minimum
    >>> w.detach()
    tensor([0., 0.])
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from curvature import kernels
from curvature.core import checks
from curvature.core.parallel import world

DISTRIBUTIONS = ("rademacher", "gaussian")
PROBES = ("per-rank", "shared")


def _world() -> int:
    return world()[1]


def _average(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average ``tensors`` over the ranks: one all-reduce of the concatenation per dtype and
    device (a bucket each; the same buckets on every rank, which hold the same parameters)."""
    out = list(tensors)
    buckets: dict = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        for i, f in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = f.view_as(tensors[i])
    return out


class AdaHessian(Optimizer):
    """AdaHessian (see the module docstring for the update rule and the calling forms).

    Args:
        params: parameters or param groups.
        lr: learning rate (0.15 is the paper's default for vision; transformers use less).
        betas: ``(beta1, beta2)`` in ``[0, 1)``.
        eps: added to the denominator.
        weight_decay: decoupled weight decay.
        hessian_power: ``kappa`` in ``[0, 1]``; 1 gives Newton-like steps.
        update_each: refresh the Hessian estimate every this many steps.
        n_samples: Hutchinson probes per refresh.
        distribution: ``"rademacher"`` or ``"gaussian"`` probes.
        block_length: spatial-averaging block along the last dim of 1-D/2-D parameters.
        seed: seeds a private probe generator (the global RNG is never touched).
        probes: across ``torch.distributed`` ranks: ``"per-rank"`` (rank ``r`` draws from
            ``seed + r``: ``world`` times the probes per refresh) or ``"shared"`` (every rank
            draws the same probes: the step equals one process on the concatenated batch).
        hessian_batch: the share of each batch the Hessian estimate is computed on, in
            ``(0, 1]``; below 1 the loss of that sub-batch is handed over with
            :meth:`set_hessian_closure` before each refreshing step (see the module).

    Data parallelism: do not wrap the model in ``DistributedDataParallel`` (its reducer does not
    support the double backward of the Hessian-vector product). Under an initialised process
    group the optimizer itself averages, at every step, the local gradients and (at a refresh)
    the local Hutchinson estimates, computed on each rank's own graph, in one bucketed
    all-reduce (flatten, all-reduce, unflatten), so every replica takes the same step.
    ``no_sync``-style accumulation is simply several backward passes before ``step``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.15,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        n_samples: int = 1,
        distribution: str = "rademacher",
        block_length: int = 1,
        seed: int | None = None,
        probes: str = "per-rank",
        hessian_batch: float = 1.0,
    ) -> None:
        checks.learning_rate(lr)
        checks.betas(betas)
        checks.nonnegative("eps", eps)
        checks.nonnegative("weight_decay", weight_decay)
        checks.in_range("hessian_power", hessian_power, 0, 1, "[]")
        checks.integer_at_least("update_each", update_each)
        checks.integer_at_least("n_samples", n_samples)
        checks.integer_at_least("block_length", block_length)
        checks.one_of("distribution", distribution, DISTRIBUTIONS)
        checks.one_of("probes", probes, PROBES)
        checks.in_range("hessian_batch", hessian_batch, 0, 1, "(]")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            block_length=block_length,
        )
        super().__init__(params, defaults)
        self.update_each = update_each
        self.n_samples = n_samples
        self.distribution = distribution
        self.seed = seed
        self.probes = probes
        self.hessian_batch = float(hessian_batch)
        self._hessian_closure = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self.state["hessian_counter"] = 0  # steps taken (decides the refreshes)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            rank = dist.get_rank() if _world() > 1 and self.probes == "per-rank" else 0
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed + rank)
        return self._generators[device]

    def _probe(self, p: torch.Tensor) -> torch.Tensor:
        gen = self._generator(p.device)
        if self.distribution == "rademacher":
            return (
                torch.randint(0, 2, p.shape, device=p.device, generator=gen)
                .to(p.dtype)
                .mul_(2)
                .sub_(1)
            )
        return torch.randn(p.shape, device=p.device, dtype=p.dtype, generator=gen)

    def _params_with_grad(self):
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @property
    def refreshes_next_step(self) -> bool:
        """Whether the next :meth:`step` computes a new Hessian estimate, so that its backward
        needs ``create_graph=True`` (with ``hessian_batch < 1``: that it needs the sub-batch's
        loss instead, see :attr:`needs_hessian_closure`); with ``update_each > 1`` the other
        steps take a plain backward (the cost of ``update_each = 2, 4`` in
        ``docs/bench-optim.md``)."""
        return self._refresh_due and self.hessian_batch == 1.0

    @property
    def needs_hessian_closure(self) -> bool:
        """Whether the next :meth:`step` estimates the Hessian on a sub-batch whose loss must be
        handed over first (:meth:`set_hessian_closure`)."""
        return self._refresh_due and self.hessian_batch < 1.0

    @property
    def _refresh_due(self) -> bool:
        """Whether the next :meth:`step` computes a new Hessian estimate."""
        return self.state["hessian_counter"] % self.update_each == 0

    def set_hessian_closure(self, closure) -> None:
        """``closure()`` returns the loss of the sub-batch (the first ``hessian_batch`` of the
        batch) the next refresh estimates the Hessian diagonal on; used by one step."""
        self._hessian_closure = closure

    def _sub_batch_gradients(self, params):
        closure, self._hessian_closure = self._hessian_closure, None
        if closure is None:
            raise RuntimeError(
                f"AdaHessian(hessian_batch={self.hessian_batch:g}) refreshes its Hessian estimate "
                "at this step: call optimizer.set_hessian_closure(fn) first, fn() returning the "
                "loss of the first part of the batch (RecipeTrainer and curvature train do)"
            )
        with torch.enable_grad():
            loss = closure()
            return torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)

    @torch.no_grad()
    def _hessian_diag(
        self, params: list[torch.Tensor], absolute: bool = True
    ) -> list[torch.Tensor]:
        if self.hessian_batch < 1.0:  # the sub-batch's gradient, with its graph
            sub = self._sub_batch_gradients(params)
            pairs = [(p, g) for p, g in zip(params, sub) if g is not None]
        else:
            pairs = [(p, p.grad) for p in params if p.grad is not None]
        have = [p for p, _ in pairs]  # across ranks: unused ones estimate 0
        grads = [g for _, g in pairs]
        if any(g.grad_fn is None for g in grads):
            raise RuntimeError(
                "AdaHessian refreshes its Hessian estimate at this step and needs the graph of the "
                "gradient: call loss.backward(create_graph=True) when "
                "curvature.optim.needs_create_graph(optimizer) is True (for Hugging Face models "
                "with attn_implementation='eager'), or pass a closure"
            )
        est = {p: torch.zeros_like(p) for p in params}
        with torch.enable_grad():
            for s in range(self.n_samples if have else 0):
                zs = [self._probe(p) for p in have]
                hzs = torch.autograd.grad(
                    grads, have, grad_outputs=zs, retain_graph=s < self.n_samples - 1
                )
                for p, z, hz in zip(have, zs, hzs):
                    est[p].add_(z * hz, alpha=1.0 / self.n_samples)
        est = [est[p] for p in params]
        if absolute:  # |z * Hz| before any spatial averaging, as the reference does
            for e in est:  # (across ranks: of the average over the ranks' probes)
                e.abs_()
        return est

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
                params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
                if all(p.grad is None for p in params):
                    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                    for p, g in zip(params, grads):
                        p.grad = g
        if _world() > 1:  # every trainable parameter: the same list (and collectives) on every rank
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        else:
            params = self._params_with_grad()
        if not params:
            return loss
        counter = self.state["hessian_counter"]
        refresh = self._refresh_due
        index = {p: i for i, p in enumerate(params)}
        diag = self._hessian_diag(params, absolute=_world() == 1) if refresh else None
        if _world() > 1:  # gradients and local estimates averaged in one all-reduce per dtype
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
            avg = _average(grads + (diag or []))
            for p, g in zip(params, avg[: len(params)]):
                p.grad = g
            if diag is not None:
                diag = [d.abs_() for d in avg[len(params) :]]
        self.state["hessian_counter"] = counter + 1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            ps, gs, ds, ms, vs, steps, hsteps = [], [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["hessian_step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_hessian_diag_sq"] = torch.zeros_like(p)
                st["step"] += 1
                if diag is not None:
                    st["hessian_step"] += 1
                    st["hessian_diag"] = diag[index[p]]
                # between refreshes the last estimate is folded into v at every step
                ds.append(st.get("hessian_diag", torch.zeros_like(p)))
                g = p.grad.detach()
                # release the graph held by the gradient (param -> grad -> graph -> param cycle)
                p.grad = g
                ps.append(p)
                gs.append(g)
                ms.append(st["exp_avg"])
                vs.append(st["exp_hessian_diag_sq"])
                steps.append(st["step"])
                hsteps.append(st["step"])  # bias correction counts steps, as v changes each step
            kernels.adahessian_update(
                ps,
                gs,
                ds,
                ms,
                vs,
                steps,
                hsteps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                hessian_power=group["hessian_power"],
                block_length=group["block_length"],
            )
        return loss
