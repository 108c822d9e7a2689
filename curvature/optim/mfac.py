r"""M-FAC: preconditioning by the inverse of a sliding-window damped empirical Fisher.

The authors' update. Over the last ``m = gradients`` vectors ``\hat g_i = g_i + \mathrm{wd}\,
p_{i-1}`` (the gradient with the weight decay, stored as such in the window; the current one
included),

.. math::
    F_t = \lambda I + \frac{1}{m} \sum_{i} \hat g_i \hat g_i^\top, \qquad
    u_t = F_t^{-1} \hat g_t, \qquad
    b_t = \mu b_{t-1} + (1 - \mu) u_t \;(b_0 = 0), \qquad p_t = p_{t-1} - \mathrm{lr}\, b_t .

The window starts as ``m`` zero vectors and the divisor is always ``m``, as in the reference
(``warmup="window"``). ``warmup="seen"`` divides by the vectors seen so far instead (a deliberate,
switchable deviation that keeps the Fisher's scale in the first ``m`` steps); the default follows
the measurement in ``docs/bench-optim.md``. ``tests/optim/test_optim_fidelity.py`` checks 20 steps
against a dense float64 transcription of the reference on an MLP and a conv net.

``F^-1`` is applied matrix-free through :class:`~curvature.SlidingWindowFisherInverse`
(``O(d m)`` memory; a step is two passes over the window and an ``O(m^2)`` update of the
``m x m`` inverse; the reference refactors an LU without pivoting every step, the same operator,
which PyTorch implements only on CUDA). Cost and accuracy: ``docs/bench-optim.md``. All
parameters of a group share one Fisher (their vectors are concatenated); the reference keeps one
Fisher over every group, the same with one group.

Note the scale: along the gradient ``F^-1 g`` is about ``c g / |g|^2``, so useful learning rates
are much smaller than SGD's when ``damping`` is small; with a huge ``damping`` M-FAC is SGD with
learning rate ``lr / damping``.

References:
    Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from curvature.core import checks
from curvature.core.parallel import world
from curvature.core.sliding import SlidingWindowFisherInverse
from curvature.optim._closure import run_closure


class MFAC(Optimizer):
    """The M-FAC optimizer; see the module docstring for the update rule.

    Args:
        params: parameters or param groups (each group keeps its own Fisher window).
        lr: learning rate.
        gradients: window ``m`` of gradients in the Fisher.
        damping: ``lambda > 0``.
        momentum: ``mu`` in ``[0, 1)``; an average, ``b = mu b + (1 - mu) u``, from zero.
        weight_decay: coupled weight decay (added to the gradient, and stored in the window).
        fisher_dtype: storage of the gradient window (float32, as the reference; the window
            products run in float32, the ``m x m`` algebra in float64; float64 storage makes
            every step float64).
        warmup: ``"window"`` (divide by ``gradients`` from the start, the reference) or
            ``"seen"`` (divide by the vectors seen so far).
        shard_window: under ``torch.distributed`` (a DDP-wrapped model, so every rank sees the
            same averaged gradient), split the gradient window by coordinates across the ranks:
            ``1/W`` of the window's memory per rank, at the cost of an all-reduce of ``m``
            numbers and an all-gather of the update per step. The window's state is then each
            rank's slice (load it with the same number of ranks).
    """

    def __init__(
        self,
        params,
        lr: float,
        *,
        gradients: int = 1024,
        damping: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fisher_dtype: torch.dtype = torch.float32,
        warmup: str = "window",
        shard_window: bool = False,
    ) -> None:
        checks.learning_rate(lr)
        self.warmup = checks.one_of("warmup", warmup, ("window", "seen"))
        checks.integer_at_least("gradients", gradients)
        checks.positive("damping", damping)
        checks.in_range("momentum", momentum, 0, 1, "[)")
        checks.nonnegative("weight_decay", weight_decay)
        defaults = dict(
            lr=lr,
            gradients=gradients,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        self.fisher_dtype = fisher_dtype
        self.shard_window = bool(shard_window)
        ranks = world()[1] if self.shard_window else 1
        self._fishers: dict[int, SlidingWindowFisherInverse] = {}
        # the windows are allocated at the first step: check now that they will fit
        itemsize = torch.empty(0, dtype=fisher_dtype).element_size()
        need: dict[torch.device, int] = {}
        for group in self.param_groups:
            numel = sum(p.numel() for p in group["params"] if p.requires_grad)
            dev = group["params"][0].device if group["params"] else torch.device("cpu")
            need[dev] = need.get(dev, 0) + group["gradients"] * -(-numel // ranks) * itemsize
        for dev, nbytes in need.items():
            checks.fits(
                "M-FAC's gradient windows",
                nbytes,
                dev,
                "lower gradients or pass fisher_dtype=torch.bfloat16",
            )

    def _fisher(self, index: int, group, numel: int, device) -> SlidingWindowFisherInverse:
        f = self._fishers.get(index)
        if f is None:
            f = SlidingWindowFisherInverse(
                numel,
                window=group["gradients"],
                damping=group["damping"],
                device=device,
                dtype=self.fisher_dtype,
                normalizer=self.warmup,
                shard=self.shard_window,
            )
            self._fishers[index] = f
        return f

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            g = torch.cat([p.grad.reshape(-1) for p in params])
            if not torch.isfinite(g).all():
                raise FloatingPointError(
                    "MFAC: the gradient has NaN or Inf entries; the step was skipped"
                )
            fisher = self._fisher(index, group, g.numel(), g.device)
            if fisher.num_params != g.numel():
                raise RuntimeError(
                    "MFAC: the set of parameters with gradients changed between steps"
                )
            if group["weight_decay"]:
                g = g + group["weight_decay"] * torch.cat([p.reshape(-1) for p in params])
            update = fisher.add_and_mul(g)
            if group["momentum"]:
                st = self.state[params[0]]
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = torch.zeros_like(update)
                mu = group["momentum"]
                buf.mul_(mu).add_(update, alpha=1 - mu)
                update = buf
            offset = 0
            for p in params:
                n = p.numel()
                p.add_(update[offset : offset + n].view_as(p), alpha=-group["lr"])
                offset += n
        return loss

    # The Fisher window is optimizer state: save and restore it with the rest.
    def state_dict(self):
        sd = super().state_dict()
        sd["fisher"] = {
            i: {
                "grads": f.grads.clone(),
                "gram": f.gram.clone(),
                "num_seen": f.num_seen,
                "num_params": f.num_params,
            }
            for i, f in self._fishers.items()
        }
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        fisher = state_dict.pop("fisher", {})
        super().load_state_dict(state_dict)
        self._fishers = {}
        for i, st in fisher.items():
            group = self.param_groups[int(i)]
            f = SlidingWindowFisherInverse(
                st.get("num_params", st["grads"].shape[1]),
                window=group["gradients"],
                damping=group["damping"],
                device=st["grads"].device,
                dtype=self.fisher_dtype,
                normalizer=self.warmup,
                shard=self.shard_window,
            )
            if f.grads.shape != st["grads"].shape:
                raise ValueError(
                    f"MFAC.load_state_dict: the saved window slice has shape "
                    f"{list(st['grads'].shape)}, this rank's has {list(f.grads.shape)}: a sharded "
                    "window loads only with the same number of ranks"
                )
            f.grads.copy_(st["grads"])
            f.gram.copy_(st["gram"])
            f.num_seen = st["num_seen"]
            f.refactor()
            self._fishers[int(i)] = f
