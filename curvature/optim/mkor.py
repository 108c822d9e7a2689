r"""MKOR: Kronecker-factored preconditioning with rank-1 Sherman-Morrison updates, and MKOR-H.

For every ``nn.Linear`` layer (weight ``W`` of shape ``[out, in]``, bias folded in as a last
input column; an ``nn.Conv2d`` with ``groups=1`` counts as the linear map from its unfolded
``in * kh * kw`` input patches to its output channels) forward and backward hooks record ``a``,
the batch mean of the layer inputs (with a 1 appended for the bias), and ``g``, the batch mean of
the per-sample output gradients (the sum of the output gradients of a mean-reduced loss). Every
``inv_freq`` steps the factor inverses are updated by the authors' code's rule
(``factor_update="inverse"``, the default), a moving average of each inverse toward ``I`` and a
rank-1 Sherman-Morrison term of weight 1,

.. math::  L^{-1} \leftarrow \mathrm{SM}(\gamma L^{-1} + (1-\gamma) I,\; a), \qquad
           R^{-1} \leftarrow \mathrm{SM}(\gamma R^{-1} + (1-\gamma) I,\; g), \qquad
           \mathrm{SM}(P, v) = P - \frac{P v v^\top P}{1 + v^\top P v},

with ``gamma = decay`` (0.95, the constant of the reference). A layer's first factor step sets its
inverses to ``I / damping`` (the reference: ``I``) and folds in nothing. ``factor_update="factor"`` is
the paper's equation instead, ``L <- gamma L + (1 - gamma) a a^T`` inverted exactly from
``L_0 = damping I``, folding in the first statistics. The gradient ``G = [dW | db]`` is then
preconditioned and rescaled before the first-order base optimizer (SGD, Adam, AdamW or LAMB)
takes the step:

.. math::  U = R^{-1} G L^{-1}, \qquad
           G \leftarrow U \cdot \frac{\lVert dW \rVert + \lVert db \rVert}
                                        {\lVert U_W \rVert + \lVert U_b \rVert}.

``tests/optim/test_optim_fidelity.py`` checks 20 steps against a dense float64 transcription of the
reference on an MLP and a conv net (``inv_freq`` 1 and 3).

Gradient accumulation: when several backward passes run before a step, ``a`` and ``g`` are
the equal-weight averages of the micro-batches' statistics, as the reference's hooks accumulate
them. Like the reference, ``g`` then follows the scale of the micro-batch losses: with each loss
divided by the number of micro-batches (as HF ``Trainer`` does), ``g`` is that fraction of the
one-pass value. Statistics are recorded only in steps that update the factors (every
``inv_freq``-th), as in the reference; a forward pass repeated for activation checkpointing
counts twice.

Data parallelism: wrap the model in ``DistributedDataParallel`` as usual (it averages the
gradients) and give MKOR the model; under an initialised process group the factor statistics
``a`` and ``g`` of every layer are averaged over the ranks in one all-reduce before the rank-1
updates, so every replica applies the same preconditioner (without it, replicas drift apart).
The state is the same on every rank: ``state_dict`` loads on any number of ranks.

Defects of the reference code that are not copied: its stabiliser's blend is dead code (a
membership test of a module in a list of tensors is always true, so every reset is a hard reset),
its reset threshold (``max |inverse| > 2``) cannot be reached because its update keeps the
inverse's eigenvalues at or below 1, its ``stat_decay`` argument is stored but never used (0.95 is
hard-coded: here ``decay`` is that constant), it needs a ``model.device`` attribute, and it keeps
factors in float16 by default, where ``v^T P v`` overflows and the rank-1 term silently vanishes
(here float64). It also clamps statistics to +-100, which this implementation does not.

Stabiliser (the paper's): when an inverse factor's largest entry exceeds ``stability_threshold``
times its initial ``1/damping`` or is not finite, the factor is blended back toward ``damping * I`` by
``stability_blend`` (``L <- (1 - b) L + b * damping * I``, computed exactly); a non-finite factor is
reset. With the default update the inverse stays bounded and the stabiliser does not fire, as in
the reference.

MKOR-H (``hybrid=True``): the loss passed to :meth:`MKOR.step` (through a closure) or
:meth:`MKOR.observe_loss` is averaged over windows of ``switch_window`` steps. The rate of
decrease per window is compared with the best rate seen so far; when it falls below
``switch_ratio`` times that best rate for ``switch_patience`` windows in a row, the second-order
updates have stopped accelerating the loss decrease, and the optimizer switches permanently to
its base optimizer (logged at INFO level and recorded in ``optimizer.switched_at_step``).
Source of the rule: the MKOR paper describes MKOR-H's switch only as a "loss decrease
rate-based" return to the first-order method once second-order steps stop paying off, with no
equation, threshold or window, and the authors' public code has no MKOR-H (their BERT example
resumes an MKOR checkpoint with LAMB by hand). The window / ratio / patience rule and its
defaults are therefore this toolkit's reading of that sentence, not a transcription;
``tests/optim/test_optim.py`` pins the exact step at which it fires, the reset of the patience count,
and that the steps after the switch are the base optimizer's alone.

Layers are excluded by name or ``re:`` pattern (``exclude``), e.g. a 30k-wide vocabulary
projection whose ``R`` would be 30k x 30k. Other layers (embeddings, norms, grouped or
depthwise convolutions) are updated by the base optimizer alone.

References:
    Mozaffari, Li, Zhang, Mehri Dehnavi, "MKOR: Momentum-Enabled Kronecker-Factor-Based Optimizer
    Using Rank-1 Updates", NeurIPS 2023.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
import weakref

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from curvature.core import checks
from curvature.core.kronecker import KroneckerFactorInverse
from curvature.core.parallel import world
from curvature.optim._closure import run_closure
from curvature.optim.lamb import LAMB

log = logging.getLogger(__name__)
BASE_OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")


def _base(name: str, params, lr, momentum, betas, weight_decay, eps):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "lamb":
        return LAMB(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    checks.one_of("base_optimizer", name, BASE_OPTIMIZERS)
    raise AssertionError("unreachable")


#: bytes per factor entry: the float64 inverse and its copy in the gradient's dtype (float32)
FACTOR_ENTRY_BYTES = 8 + 4


def factor_bytes(module: torch.nn.Module) -> int:
    """Memory of the two Kronecker factors MKOR keeps for ``module``."""
    out_dim, in_dim = module.weight.shape[0], module.weight[0].numel()
    in_dim += int(module.bias is not None)
    return (in_dim * in_dim + out_dim * out_dim) * FACTOR_ENTRY_BYTES


def _tied_to_embeddings(model: torch.nn.Module) -> set[str]:
    """Names of the linear layers whose weight is an embedding's (a tied output head)."""
    embedded = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m.weight.data_ptr() in embedded
    }


def plan_layers(model: torch.nn.Module, candidates: list[str], budget: int | None) -> list[str]:
    """The layers MKOR preconditions: ``candidates`` without output heads tied to the embeddings
    and, while their factors exceed ``budget`` bytes, without the largest; one warning line says
    which were left to the base optimizer. ``MemoryError`` when no layer fits."""
    modules = dict(model.named_modules())
    tied = sorted(_tied_to_embeddings(model) & set(candidates))
    keep = [n for n in candidates if n not in tied]
    left = []
    if budget is not None:
        by_size = sorted(keep, key=lambda n: factor_bytes(modules[n]), reverse=True)
        total = sum(factor_bytes(modules[n]) for n in keep)
        while by_size and total > budget:
            name = by_size.pop(0)
            total -= factor_bytes(modules[name])
            left.append(name)
        keep = [n for n in keep if n not in left]
    if left and not keep:
        smallest = min(factor_bytes(modules[n]) for n in left) / 2**30
        raise MemoryError(
            f"MKOR: no layer's factors fit in max_memory ({(budget or 0) / 2**30:.2f} GiB; the "
            f"smallest layer needs {smallest:.2f} GiB): raise max_memory or use the base optimizer"
        )
    if tied or left:
        parts = []
        if tied:
            parts.append(f"{', '.join(tied)} (tied to the input embeddings)")
        if left:
            need = sum(factor_bytes(modules[n]) for n in left) / 2**30
            parts.append(
                f"{', '.join(left)} (their factors, {need:.1f} GiB, exceed the budget of "
                f"{budget / 2**30:.1f} GiB: pass max_memory or exclude)"
            )
        warnings.warn(f"MKOR: left to the base optimizer: {'; '.join(parts)}", stacklevel=3)
    return keep


def _supported(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return (
        isinstance(module, torch.nn.Conv2d)
        and module.groups == 1
        and isinstance(module.padding, tuple)  # 'same'/'valid' strings are resolved by torch only
        and module.padding_mode == "zeros"
    )


class _LayerState:
    """Hooks and factor inverses of one ``nn.Linear`` or ``nn.Conv2d`` layer.

    A convolution is treated as the linear map from its unfolded input patches
    (``in_channels * kh * kw`` values) to its output channels: ``a`` is the mean patch over the
    batch and all output positions, and the weight gradient is viewed as
    ``[out_channels, in_channels * kh * kw]``.

    ``g`` is the per-sample output gradient averaged over the batch, as the reference computes
    it: the output gradient of a mean-reduced loss is ``1/N`` of the per-sample one, so ``g`` is
    the sum of the output gradients over the rows (for a convolution, over the batch of their
    mean over positions). Its scale then does not depend on the batch size.
    """

    def __init__(
        self, name: str, module: torch.nn.Module, decay: float, damping: float, form: str = "factor"
    ):
        self.name = name
        self.module = module
        self.has_bias = module.bias is not None
        self.conv = isinstance(module, torch.nn.Conv2d)
        out_dim = module.weight.shape[0]
        in_dim = module.weight[0].numel()
        dev = module.weight.device
        self.left = KroneckerFactorInverse(
            in_dim + int(self.has_bias), decay=decay, damping=damping, device=dev, form=form
        )
        self.right = KroneckerFactorInverse(
            out_dim, decay=decay, damping=damping, device=dev, form=form
        )
        # statistics of the micro-batches since the last step: sums and counts
        self._a_sum: torch.Tensor | None = None
        self._g_sum: torch.Tensor | None = None
        self._na = self._ng = 0
        self.record = True  # set by the optimizer: only steps that update the factors record
        self.started = False  # had a factor step (the reference's first one only resets)
        self._applied: tuple[torch.Tensor, torch.Tensor] | None = None  # inverses in grad dtype
        self.handles = [module.register_forward_hook(self._forward)]

    @property
    def a(self) -> torch.Tensor | None:
        """The mean input over the micro-batches since the last step (equal weights)."""
        return None if self._a_sum is None else self._a_sum / self._na

    @property
    def g(self) -> torch.Tensor | None:
        """The per-sample output gradient, averaged over the micro-batches (equal weights)."""
        return None if self._g_sum is None else self._g_sum / self._ng

    def clear(self) -> None:
        self._a_sum = self._g_sum = None
        self._na = self._ng = 0

    def factors_changed(self) -> None:
        """Forget the converted inverses (after a factor update, a reset or a load)."""
        self._applied = None

    def inverses(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R^-1, L^-1)`` in ``dtype``, converted once per factor update."""
        if self._applied is None or self._applied[0].dtype != dtype:
            self._applied = (self.right.inverse.to(dtype), self.left.inverse.to(dtype))
        return self._applied

    def _forward(self, module, inputs, output):
        if not self.record or not torch.is_grad_enabled() or not output.requires_grad:
            return
        # the output gradient is read by a hook on the output tensor (a module backward hook
        # would warn for first layers, whose inputs need no gradient)
        output.register_hook(self._backward)
        x = inputs[0].detach()
        if self.conv:
            if x.dim() == 3:  # unbatched input
                x = x[None]
            m = module
            patches = torch.nn.functional.unfold(
                x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
            )  # [N, C*kh*kw, L]
            x = patches.mean(dim=(0, 2))
        else:
            x = x.reshape(-1, module.in_features).mean(0)
        if self.has_bias:
            x = torch.cat([x, x.new_ones(1)])
        self._a_sum = x if self._a_sum is None else self._a_sum + x
        self._na += 1

    def _backward(self, grad: torch.Tensor) -> None:
        module = self.module
        g = grad.detach()
        if self.conv:
            if g.dim() == 3:  # unbatched input
                g = g[None]
            # per sample: the mean over positions; summed over the batch
            g = g.mean(dim=(2, 3)).sum(0)
        else:
            g = g.reshape(-1, module.weight.shape[0]).sum(0)
        self._g_sum = g if self._g_sum is None else self._g_sum + g
        self._ng += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _remove_hooks(layers) -> None:
    for layer in layers:
        layer.remove()


class MKOR(Optimizer):
    """MKOR and MKOR-H; see the module docstring for the rule, stabiliser and switch.

    Args:
        model: the module whose ``nn.Linear`` and ``nn.Conv2d`` layers are preconditioned (hooks
            are attached).
        lr: learning rate of the base optimizer.
        base_optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"lamb"``.
        momentum, betas, eps, weight_decay: passed to the base optimizer.
        decay: ``gamma`` of the factor moving averages.
        damping: initial factors ``damping * I``.
        inv_freq: update the factor inverses every this many steps.
        exclude: layer names or ``re:`` patterns left to the base optimizer alone.
        stability_threshold, stability_blend: the stabiliser.
        hybrid: enable MKOR-H's automatic switch to the base optimizer.
        switch_window, switch_ratio, switch_patience: the MKOR-H rule.
        max_memory: bytes the factors may take (default: half the memory the parameters' device
            has free). Output heads tied to the input embeddings are always left to the base
            optimizer, and while the factors exceed ``max_memory`` the largest layers are too
            (one warning line names them); no layer fitting is a ``MemoryError``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        *,
        base_optimizer: str = "sgd",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay: float = 0.95,
        damping: float = 1.0,
        inv_freq: int = 10,
        exclude: list[str] | tuple[str, ...] = (),
        stability_threshold: float = 1e3,
        stability_blend: float = 0.5,
        hybrid: bool = False,
        factor_update: str = "inverse",
        switch_window: int = 20,
        switch_ratio: float = 0.5,
        switch_patience: int = 2,
        max_memory: int | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                "MKOR takes the model (it hooks its linear layers), not a parameter list"
            )
        checks.learning_rate(lr)
        checks.betas(betas)
        checks.positive("damping", damping)
        checks.integer_at_least("inv_freq", inv_freq)
        checks.in_range("decay", decay, 0, 1, "()")
        checks.in_range("stability_blend", stability_blend, 0, 1, "(]")
        checks.positive("stability_threshold", stability_threshold)
        checks.integer_at_least("switch_window", switch_window)
        checks.integer_at_least("switch_patience", switch_patience)
        checks.in_range("switch_ratio", switch_ratio, 0, 1, "()")
        params = [p for p in model.parameters() if p.requires_grad]
        self.base = _base(base_optimizer, params, lr, momentum, tuple(betas), weight_decay, eps)
        super().__init__(params, dict(lr=lr))
        self.param_groups = self.base.param_groups  # one source of truth for lr schedulers
        patterns = [re.compile(e[3:]) if e.startswith("re:") else e for e in exclude]

        def excluded(name):
            return any(p.match(name) if isinstance(p, re.Pattern) else p == name for p in patterns)

        self.factor_update = checks.one_of("factor_update", factor_update, ("inverse", "factor"))
        candidates = [
            n
            for n, m in model.named_modules()
            if _supported(m) and not excluded(n) and m.weight.requires_grad
        ]
        if max_memory is None:  # half of what the parameters' device has free now
            free = checks.available_bytes(params[0].device) if params else None
            max_memory = None if free is None else free // 2
        else:
            checks.integer_at_least("max_memory", max_memory)
        modules = dict(model.named_modules())
        self.layers = [
            _LayerState(n, modules[n], decay, damping, form=factor_update)
            for n in plan_layers(model, candidates, max_memory)
        ]
        self.base_optimizer = base_optimizer
        self.inv_freq = inv_freq
        self.stability_threshold = stability_threshold
        self.stability_blend = stability_blend
        self.hybrid = hybrid
        self.exclude = tuple(exclude)
        self.switch_window, self.switch_ratio, self.switch_patience = (
            switch_window,
            switch_ratio,
            switch_patience,
        )
        self.steps = 0
        self.switched_at_step: int | None = None
        self._losses: list[float] = []
        self._window_means: list[float] = []
        self._best_rate = 0.0
        self._slow_windows = 0
        self.stabilised = 0  # how many times the stabiliser fired
        # the hooks hold the layer states, not the optimizer: when it is garbage collected (or
        # closed) they are removed from the model
        self._finalizer = weakref.finalize(self, _remove_hooks, list(self.layers))

    # ------------------------------------------------------------------ hooks
    def close(self) -> None:
        """Remove the hooks from the model (the optimizer then acts as its base optimizer)."""
        self._finalizer()

    def __enter__(self) -> MKOR:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ MKOR-H
    def observe_loss(self, loss: float | torch.Tensor) -> None:
        if not self.hybrid or self.switched_at_step is not None:
            return
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if world()[1] > 1:
            # every rank decides the switch from the same losses (the mean over ranks), so all
            # switch at the same step: a rank that stopped its factor all-reduce alone would hang
            device = self.layers[0].module.weight.device if self.layers else None
            t = torch.tensor([value], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            value = float(t.item()) / dist.get_world_size()
        if not math.isfinite(value):
            return
        self._losses.append(value)
        if len(self._losses) < self.switch_window:
            return
        self._window_means.append(sum(self._losses) / len(self._losses))
        self._losses = []
        if len(self._window_means) < 2:
            return
        rate = self._window_means[-2] - self._window_means[-1]  # decrease per window
        self._best_rate = max(self._best_rate, rate)
        if self._best_rate > 0 and rate < self.switch_ratio * self._best_rate:
            self._slow_windows += 1
        else:
            self._slow_windows = 0
        if self._slow_windows >= self.switch_patience:
            self.switched_at_step = self.steps
            for layer in self.layers:
                layer.remove()
            log.info(
                "MKOR-H: switching to %s at step %d (loss decrease per %d steps %.4g < %.2f x best %.4g)",
                self.base_optimizer,
                self.steps,
                self.switch_window,
                rate,
                self.switch_ratio,
                self._best_rate,
            )

    # ------------------------------------------------------------------ step
    def _stabilise(self, factor: KroneckerFactorInverse) -> None:
        inv = factor.inverse
        if not torch.isfinite(inv).all():
            factor.reset(1.0)
            self.stabilised += 1
        elif inv.abs().max() > self.stability_threshold / factor.damping:
            factor.reset(self.stability_blend)
            self.stabilised += 1

    def _update_factors(self) -> None:
        """All layers' factor inverses in one batched Sherman-Morrison call, then the stabiliser.

        With ``factor_update="inverse"`` (the reference), a layer's first factor step sets its
        inverses to ``I / damping`` and folds in nothing (the step is preconditioned by the identity).
        """
        ready = [
            l
            for l in self.layers
            if l.module.weight.grad is not None and l.a is not None and l.g is not None
        ]
        if self.factor_update == "inverse":
            first = [l for l in ready if not l.started]
            for layer in first:
                layer.started = True
                layer.left.reset(1.0)
                layer.right.reset(1.0)
            ready = [l for l in ready if l not in first]
        factors = [f for l in ready for f in (l.left, l.right)]
        vectors = [v for l in ready for v in (l.a, l.g)]
        if vectors and world()[1] > 1:
            # every replica folds in the same statistics: the means over all ranks' batches, in
            # one all-reduce (linear in the layer widths, as the method is designed)
            flat = torch.cat([v.reshape(-1).to(torch.float64) for v in vectors])
            dist.all_reduce(flat)
            flat.div_(dist.get_world_size())
            vectors = [
                f.view_as(v).to(v.dtype)
                for f, v in zip(flat.split([v.numel() for v in vectors]), vectors)
            ]
        KroneckerFactorInverse.update_many(factors, vectors)
        for f in factors:
            self._stabilise(f)
        for layer in self.layers:
            layer.factors_changed()

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        if loss is not None:
            self.observe_loss(loss)
        if self.switched_at_step is None:
            if self.steps % self.inv_freq == 0:
                self._update_factors()
            for layer in self.layers:
                w = layer.module.weight
                if w.grad is None:
                    continue
                grad = w.grad.reshape(w.shape[0], -1)
                if layer.has_bias:
                    b = layer.module.bias.grad
                    b = (
                        torch.zeros(w.shape[0], device=w.device, dtype=grad.dtype)
                        if b is None
                        else b
                    )
                    grad = torch.cat([grad, b[:, None]], dim=1)
                # 16-bit gradients are preconditioned in float32 (inverse entries reach
                # stability_threshold / damping, past float16's range)
                dtype = torch.promote_types(grad.dtype, torch.float32)
                r_inv, l_inv = layer.inverses(dtype)
                grad = grad.to(dtype)
                u = r_inv @ grad @ l_inv
                # rescale to the gradient's size: (|dW| + |db|) / (|U_W| + |U_b|), as the
                # reference does (the norms of the weight and bias parts added, not joined)
                nw = int(layer.has_bias)
                gn = grad[:, : grad.shape[1] - nw].norm() + (grad[:, -1].norm() if nw else 0.0)
                un = u[:, : u.shape[1] - nw].norm() + (u[:, -1].norm() if nw else 0.0)
                if un > 0 and torch.isfinite(un):
                    u = u * (gn / un)
                    w.grad.copy_(u[:, : grad.shape[1] - int(layer.has_bias)].view_as(w.grad))
                    if layer.has_bias and layer.module.bias.grad is not None:
                        layer.module.bias.grad.copy_(u[:, -1])
        self.steps += 1
        record = self.switched_at_step is None and self.steps % self.inv_freq == 0
        for layer in self.layers:  # the next step's statistics start afresh
            layer.clear()
            layer.record = record
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and drop statistics of passes that no step consumed (a forward
        and backward before the first step, or a step skipped by a gradient scaler)."""
        self.base.zero_grad(set_to_none=set_to_none)
        for layer in self.layers:
            layer.clear()

    def state_dict(self):
        return {
            "base": self.base.state_dict(),
            "steps": self.steps,
            "switched_at_step": self.switched_at_step,
            "factors": {
                l.name: (l.left.inverse.clone(), l.right.inverse.clone()) for l in self.layers
            },
            "started": {l.name: l.started for l in self.layers},
            "hybrid": (
                list(self._losses),
                list(self._window_means),
                self._best_rate,
                self._slow_windows,
            ),
        }

    def load_state_dict(self, state_dict):
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups
        self.steps = state_dict["steps"]
        self.switched_at_step = state_dict["switched_at_step"]
        if self.switched_at_step is not None:  # switched before the checkpoint: no more hooks
            for layer in self.layers:
                layer.remove()
        record = self.switched_at_step is None and self.steps % self.inv_freq == 0
        for layer in self.layers:  # the next step's statistics start afresh, as after a step
            layer.clear()
            layer.record = record
        for layer in self.layers:
            if layer.name in state_dict["factors"]:
                left, right = state_dict["factors"][layer.name]
                layer.left.inverse = left.clone().to(layer.left.inverse.device)
                layer.right.inverse = right.clone().to(layer.right.inverse.device)
                layer.started = state_dict.get("started", {}).get(layer.name, True)
                layer.factors_changed()
        losses, means, best, slow = state_dict["hybrid"]
        self._losses, self._window_means, self._best_rate, self._slow_windows = (
            list(losses),
            list(means),
            best,
            slow,
        )
