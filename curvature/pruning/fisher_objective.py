"""The Fisher-weighted layer objective: reconstruct the outputs that the loss is sensitive to.

The layer-wise methods minimise ``||W X - W' X||^2``: every output of the layer, at every token,
counts the same. To second order, the loss change from perturbing a layer's outputs ``y_t = W x_t``
by ``dy_t`` is ``1/2 sum_t dy_t^T F_t dy_t`` with ``F_t`` the Fisher of the loss in ``y_t``. Its
empirical, diagonal form is ``F_t = diag(g_t^2)``, ``g_t = dL/dy_t`` on the calibration data, and
the objective becomes

    E(W') = sum_i sum_t g_it^2 ((W_i - W'_i) x_t)^2.

One ``[cols, cols]`` matrix per output row is too much (``rows x cols^2``); the toolkit uses the
separable approximation ``g_it^2 ~ r_i s_t`` with row weights ``r_i = sum_t g_it^2`` and token
weights ``s_t = sum_i g_it^2``, each normalised to mean 1 and mixed with the uniform weights,
``r <- (1 - a) + a r`` (``a = fisher_mix``, default 0.5), ``s <- (1 - b) + b s``
(``b = fisher_token_mix``, default 0: off, see below):

    E(W') = sum_i r_i (W_i - W'_i) H_s (W_i - W'_i)^T,      H_s = 2/N sum_t s_t x_t x_t^T.

OBS algebra of the weighted objective. Row ``i``'s term is a quadratic with Hessian ``r_i H_s``.
Removing weight ``q`` of row ``i`` with the best change ``d`` of the row's other weights,

    min_d  r_i d H_s d^T   s.t.  (w_i + d)_q = 0
    d* = -(w_iq / [H_s^-1]_qq) [H_s^-1]_q:,        cost  r_i w_iq^2 / (2 [H_s^-1]_qq),

so the correction is the unweighted OBS correction on ``H_s`` (``r_i`` cancels: it scales the
whole row's objective) and the cost is scaled by ``r_i``. The column sweep, the greedy
per-row order and the fixed-mask reconstruction are therefore those of SparseGPT/OBC on ``H_s``,
and ``r`` enters only where costs of different rows are compared: the unstructured choice of a
column block (SparseGPT) and the layer's cheapest steps across rows (OBC). N:M masks and
Wanda's per-row choice compare within a row, so ``r`` does not change them; ``H_s`` does.
With ``a = b = 0`` (or uniform gradients) ``r = 1`` and ``H_s = H``: the unweighted methods exactly.

Token weights are off by default: the empirical ``g_t^2`` of one token is a one-sample estimate
of that token's Fisher, and weighting ``H`` by it shrinks the calibration set's effective size.
On the constructed layer of ``tests/pruning/test_layer_parts.py`` (outputs read with scales spanning
three decades, labels drawn from the model) token weights raised the held-out KL of SparseGPT at
2:4 from 0.477 to 0.565 (``b = 0.5``) and 0.646 (``b = 1``), while row weights lowered it at 70%
unstructured from 1.36 to 1.01 (``a = 0.5``) and 0.017 (``a = 1``).

The gradients are taken once, from the model before pruning, by one forward and backward pass per
calibration batch (``torch.autograd.grad`` of ``loss_fn``'s loss in every selected layer's
output; parameters' ``.grad`` are left untouched). Token weights are kept per batch, in the order
the batches are read, and applied to the same tokens when the layer-wise runner accumulates
``H_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

F64 = torch.float64


@dataclass
class OutputFisher:
    """One layer's weights: ``rows`` (``[rows]``) and ``tokens`` (one ``[tokens]`` per batch)."""

    rows: torch.Tensor
    tokens: list[torch.Tensor]

    def mixed(self, a: float, b: float | None = None) -> OutputFisher:
        """Normalised to mean 1 and mixed with the uniform weights: ``(1 - a) + a r`` for the
        rows, ``(1 - b) + b s`` for the tokens (``b`` defaults to ``a``)."""
        b = a if b is None else b
        r = self.rows / self.rows.mean().clamp_min(torch.finfo(F64).tiny)
        total = sum(float(t.sum()) for t in self.tokens)
        count = sum(t.numel() for t in self.tokens)
        mean = max(total / max(count, 1), torch.finfo(F64).tiny)
        return OutputFisher((1 - a) + a * r, [(1 - a) + a * (t / mean) for t in self.tokens])


def split_batch(batch, size: int) -> list:
    """``batch`` cut along its first dimension into pieces of ``size`` examples: a tensor, or a
    dict/tuple/list of tensors of one batch size (other values are passed to every piece).
    Anything else, or a batch no larger than ``size``, is one piece."""
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0] if batch.dim() else 0
    elif isinstance(batch, dict):
        sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()}
        n = sizes.pop() if len(sizes) == 1 else 0
    elif isinstance(batch, (tuple, list)):
        sizes = {v.shape[0] for v in batch if isinstance(v, torch.Tensor) and v.dim()}
        n = sizes.pop() if len(sizes) == 1 else 0
    else:
        n = 0
    if n <= size:
        return [batch]

    def cut(v, sl):
        return v[sl] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

    out = []
    for i in range(0, n, size):
        sl = slice(i, min(i + size, n))
        if isinstance(batch, torch.Tensor):
            out.append(batch[sl])
        elif isinstance(batch, dict):
            out.append({k: cut(v, sl) for k, v in batch.items()})
        else:
            out.append(type(batch)(cut(v, sl) for v in batch))
    return out


def collect(
    model, data, loss_fn, targets, *, progress: bool = True, micro_batch: int | None = 1
) -> dict[str, OutputFisher]:
    """Row and token sums of the squared output gradients of each target layer (raw, unmixed).

    ``targets``: :class:`~curvature.pruning.layerwise.LayerTarget`. A layer called more than
    once per forward pass (weights shared) is refused: its tokens would not line up.
    ``micro_batch``: examples per forward and backward pass (each calibration batch is cut along
    its first dimension, :func:`split_batch`; ``None``: whole batches). The backward pass holds
    the whole model's activations: on SmolLM2 a batch of 8 x 512 tokens peaked at 21.9 GB, one
    sequence at a time at a few GB. With a loss averaged over each piece, every piece's
    gradients are scaled by the same constant when the pieces are of equal size and token
    count, which the normalisation of the weights removes (pieces of unequal token counts are
    weighted slightly differently from the whole batch's loss).
    """
    rows = {t.name: None for t in targets}
    tokens: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    outputs: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def fn(module, args, out):
            outputs.setdefault(name, []).append(out)

        return fn

    handles = [t.module.register_forward_hook(hook(t.name)) for t in targets]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for whole in tqdm(data, desc="output Fisher", disable=not progress, leave=False):
            pieces = [whole] if micro_batch is None else split_batch(whole, micro_batch)
            piece_rows, piece_tokens = {}, {}
            for batch in pieces:
                _backward(model, loss_fn, batch, targets, outputs, piece_rows, piece_tokens)
            for n, r in piece_rows.items():
                rows[n] = r if rows[n] is None else rows[n] + r
                tokens[n].append(torch.cat(piece_tokens[n]))
            batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("data yielded no batches: pass a re-iterable of calibration batches")
    out = {}
    for t in targets:
        if rows[t.name] is None:
            raise ValueError(
                f"{t.name}: its layer never ran on the calibration data (is it used in the "
                "forward pass that loss_fn makes?)"
            )
        out[t.name] = OutputFisher(rows[t.name], tokens[t.name])
    return out


def _backward(model, loss_fn, batch, targets, outputs, rows, tokens) -> None:
    """One forward and backward pass: the squared output gradients of the targets, summed over
    tokens (into ``rows``) and over outputs (appended to ``tokens``)."""
    outputs.clear()
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        names = [t.name for t in targets if t.name in outputs]
        for n in names:
            if len(outputs[n]) != 1:
                raise ValueError(
                    f"{n}: its layer ran {len(outputs[n])} times in one forward pass; "
                    "the Fisher-weighted objective needs one output per token"
                )
        if not loss.requires_grad:
            raise ValueError(
                "objective='fisher': loss_fn's loss does not depend on the model's "
                "weights (no gradient to weight the layers' outputs by)"
            )
        grads = torch.autograd.grad(loss, [outputs[n][0] for n in names], allow_unused=True)
    for n, g in zip(names, grads):
        y = outputs[n][0]
        g = torch.zeros_like(y) if g is None else g
        g2 = g.detach().reshape(-1, g.shape[-1]).to(F64) ** 2
        rows[n] = g2.sum(0) if n not in rows else rows[n] + g2.sum(0)
        tokens.setdefault(n, []).append(g2.sum(1).cpu())
    outputs.clear()
