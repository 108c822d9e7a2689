r"""Hessian-vector products and Hutchinson estimates of the Hessian diagonal and trace.

``H v`` is computed by double backward: the gradient is taken with ``create_graph=True`` and then
differentiated along ``v``. Hutchinson's estimators use probes ``z`` with ``E[z z^T] = I``:

.. math::  \mathrm{diag}(H) = \mathbb{E}[z \odot H z], \qquad \mathrm{tr}(H) = \mathbb{E}[z^\top H z].

Rademacher probes (entries +-1 with equal probability, mean zero) have the lowest variance for the
trace; Gaussian probes are also offered. Probes are drawn from the ``generator`` passed in (never by
re-seeding the global RNG). Every estimate is averaged in float64.

References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989.
    Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning", AAAI 2021.

Example:
    >>> import torch
    >>> from curvature import hessian_vector_product
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> loss = (w ** 2).sum()
    >>> hessian_vector_product(loss, [w], [torch.tensor([1.0, 0.0])])[0]
    tensor([2., 0.])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curvature.core import checks as _checks

DISTRIBUTIONS = ("rademacher", "gaussian")


def _params(params: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if not params:
        raise ValueError("params is empty: pass the tensors to differentiate with respect to")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad")
    return params


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if loss.dim() != 0:
        raise ValueError(f"loss must be a scalar tensor, got shape {list(loss.shape)}")
    if loss.grad_fn is None:
        raise ValueError("loss has no graph: compute it from params with autograd enabled")
    return torch.autograd.grad(loss, params, create_graph=True)


def _hvp(grads, params, vectors) -> list[torch.Tensor]:
    hv = torch.autograd.grad(grads, params, grad_outputs=vectors, retain_graph=True)
    return [h.detach() for h in hv]


def hessian_vector_product(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """``H v``: one tensor per parameter, ``H`` the Hessian of ``loss`` w.r.t. ``params``.

    Raises:
        ValueError: if the loss is not a scalar with a graph, or a vector's shape differs from its
            parameter's. A model whose ops lack a double backward (fused attention kernels) fails
            inside autograd; Hugging Face models then need ``attn_implementation="eager"``.
    """
    params = _params(params)
    vectors = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
    if len(vectors) != len(params):
        raise ValueError(f"got {len(vectors)} vectors for {len(params)} params")
    for i, (p, v) in enumerate(zip(params, vectors)):
        if v.shape != p.shape:
            raise ValueError(f"vectors[{i}] has shape {list(v.shape)}, params[{i}] {list(p.shape)}")
    grads = _grads(loss, params)
    return _hvp(grads, params, [v.to(p.dtype) for p, v in zip(params, vectors)])


def _probe(p: torch.Tensor, distribution: str, generator: torch.Generator | None) -> torch.Tensor:
    gen_device = generator.device if generator is not None else p.device
    if distribution == "rademacher":
        z = torch.randint(0, 2, p.shape, generator=generator, device=gen_device) * 2 - 1
    else:
        z = torch.randn(p.shape, generator=generator, device=gen_device)
    return z.to(device=p.device, dtype=p.dtype)


def _check_sampling(num_samples: int, distribution: str) -> None:
    _checks.positive_int("num_samples", num_samples)
    _checks.one_of("distribution", distribution, DISTRIBUTIONS)


def hutchinson_diagonal(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    num_samples: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Unbiased estimate of ``diag(H)`` from ``num_samples`` probes; one tensor per parameter."""
    params = _params(params)
    _check_sampling(num_samples, distribution)
    grads = _grads(loss, params)
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for _ in range(num_samples):
        zs = [_probe(p, distribution, generator) for p in params]
        for a, z, hz in zip(acc, zs, _hvp(grads, params, zs)):
            a += (z * hz).to(torch.float64)
    return [(a / num_samples).to(p.dtype) for a, p in zip(acc, params)]


def hutchinson_trace(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    num_samples: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Unbiased estimate of ``tr(H)`` (a float64 scalar tensor) from ``num_samples`` probes."""
    params = _params(params)
    _check_sampling(num_samples, distribution)
    grads = _grads(loss, params)
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(num_samples):
        zs = [_probe(p, distribution, generator) for p in params]
        hz = _hvp(grads, params, zs)
        total += sum((z * h).to(torch.float64).sum().cpu() for z, h in zip(zs, hz))
    return total / num_samples
