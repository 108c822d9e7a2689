r"""LAMB, the layer-wise adaptive large-batch optimizer (a base optimizer for MKOR).

.. math::
    m_t = \beta_1 m + (1-\beta_1) g,\; v_t = \beta_2 v + (1-\beta_2) g^2,\;
    r = \hat m / (\sqrt{\hat v} + \epsilon) + \mathrm{wd}\, p,\;
    p \leftarrow p - \mathrm{lr}\, \frac{\lVert p \rVert}{\lVert r \rVert} r

(the trust ratio is 1 where either norm is zero).

References:
    You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from curvature.core import checks
from curvature.optim._closure import run_closure


class LAMB(Optimizer):
    def __init__(self, params, lr=1e-3, *, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        checks.learning_rate(lr)
        checks.betas(betas)
        checks.nonnegative("eps", eps)
        checks.nonnegative("weight_decay", weight_decay)
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                g = p.grad
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = st["exp_avg"] / (1 - b1 ** st["step"])
                v_hat = st["exp_avg_sq"] / (1 - b2 ** st["step"])
                r = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    r = r + group["weight_decay"] * p
                pn, rn = p.norm(), r.norm()
                trust = (pn / rn) if (pn > 0 and rn > 0) else torch.ones((), device=p.device)
                p.add_(r * trust, alpha=-group["lr"])
        return loss
