"""Structured pruning: whole attention heads and feed-forward neurons removed, the matrices resized.

Structured choosers are parts (frozen values with validated settings), run by one driver:

=========================  ================================================================
part                       how a block's structures are chosen (and what is corrected)
=========================  ================================================================
:class:`StructuredOBS`     greedy structured OBS on the consumer's input Hessian; the remaining
                           columns (and the bias, ``bias=True``) corrected by the OBS update
:class:`StructureNorm`     the L2 norm of the structure's weights (producer rows, consumer
                           columns); no correction
:class:`ActivationNorm`    ``sum |W_ij| ||X_j||`` over the structure's consumer columns (the
                           activation-weighted score of unstructured pruning, summed); no
                           correction
:class:`Fluctuation`       ``sum Var(X_j) ||W_:j||^2`` over its consumer columns, with the mean of
                           the removed inputs folded into the consumer's bias where it has one
:class:`FisherOBS`         greedy structured OBS on the empirical Fisher of the group's weights
                           (``lambda I + (1/m) sum g g^T`` from ``m`` calibration gradients,
                           every producer row and consumer column of the group as one block);
                           the group's remaining weights corrected by the OBS update
:class:`Taylor`            the first-order term ``sum |w * g|`` over the structure's weights, ``g``
                           the mean calibration gradient; no correction
=========================  ================================================================

The two gradient parts take their gradients once, on the model as it is before any structure is
removed (a backward pass of ``loss_fn`` per calibration batch).

The driver (:func:`run`) is sequential like the layer-wise methods: the first block's inputs
are captured once; in each block, for each coupled group (:mod:`.structures`) in order, the
consumer's input statistics are taken by running the block on the current inputs, its
structures are chosen and corrected, and the matrices shrink
(:func:`~curvature.pruning.structures.shrink`); then the block runs again to give the next block's
inputs. Targets are fractions of each kind removed in every block (the same count per block, so
that the sizes fit a model configuration).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from curvature.core import checks
from curvature.pruning import layerwise, stages, structured_obs, structures
from curvature.pruning.structures import KINDS, Coupled

F64 = torch.float64


@dataclass(frozen=True)
class StructuredChooser:
    """A structured chooser: scores a group's structures from the consumer's input statistics."""

    label: ClassVar[str] = ""
    #: the statistics it needs: ``"hessian"`` (``X^T X``), ``"moments"`` (mean and variance), none
    statistics: ClassVar[str] = "moments"
    batches: int = 128

    def __post_init__(self):
        checks.positive_int("batches", self.batches)

    def choose(self, group: Coupled, stats: _Moments, remove: int) -> tuple[list[int], float]:
        """Remove ``remove`` structures of ``group`` (writing any correction into its consumer);
        returns the removed structures and the estimated error."""
        scores = self.scores(group, stats)
        order = torch.argsort(scores).tolist()[:remove]
        self.correct(group, stats, order)
        return order, float(scores[order].sum()) if order else 0.0

    def scores(self, group: Coupled, stats: _Moments) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, group: Coupled, stats: _Moments, removed: list[int]) -> None:
        """The baselines correct nothing."""


@dataclass(frozen=True)
class StructuredOBS(StructuredChooser):
    """Greedy structured OBS (:mod:`.structured_obs`), one structure at a time, the inverse
    downdated; ``rel_damp``: damping as a fraction of ``H``'s mean diagonal; ``bias``: a consumer
    with a bias absorbs the mean of what it loses."""

    label: ClassVar[str] = "obs"
    statistics: ClassVar[str] = "hessian"
    rel_damp: float = 0.01
    bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        checks.positive("rel_damp", self.rel_damp)
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be true or false, got {self.bias!r}")

    def choose(self, group, stats, remove):
        consumer = group.consumer[1]
        w = consumer.weight.detach().to(F64)
        use_bias = self.bias and consumer.bias is not None
        res = structured_obs.remove_structures(
            w,
            stats.hessian(),
            group.columns().to(w.device),
            remove,
            rel_damp=self.rel_damp,
            bias=consumer.bias.detach() if use_bias else None,
            mean=stats.mean() if use_bias else None,
        )
        with torch.no_grad():
            consumer.weight.copy_(res.weight.to(consumer.weight.dtype))
            if res.bias is not None:
                consumer.bias.copy_(res.bias.to(consumer.bias.dtype))
        return res.removed, (res.errors[-1] if res.errors else 0.0)


@dataclass(frozen=True)
class StructureNorm(StructuredChooser):
    """The L2 norm of every weight of the structure (its producer rows and consumer columns)."""

    label: ClassVar[str] = "magnitude"
    statistics: ClassVar[str] = ""

    def scores(self, group, stats):
        all_ = list(range(group.count))
        total = torch.zeros(group.count, dtype=F64)
        for _, p in group.producers:
            w = p.weight.detach().to(F64)[group.rows(p, all_)]
            total += (w**2).reshape(group.count, -1).sum(1).cpu()
        c = group.consumer[1].weight.detach().to(F64)[:, group.columns().reshape(-1)]
        total += (c**2).reshape(c.shape[0], group.count, -1).sum((0, 2)).cpu()
        return total.sqrt()


@dataclass(frozen=True)
class ActivationNorm(StructuredChooser):
    """``sum_{j in S} sum_i |W_ij| ||X_j||`` on the consumer's columns."""

    label: ClassVar[str] = "activation"

    def scores(self, group, stats):
        w = group.consumer[1].weight.detach().to(F64).abs()
        col = w.sum(0) * stats.square().clamp_min(0).sqrt()
        return col[group.columns()].sum(1).cpu()


@dataclass(frozen=True)
class Fluctuation(StructuredChooser):
    """``sum_{j in S} Var(X_j) ||W_:j||^2`` on the consumer's columns; the removed inputs' mean
    folded into the consumer's bias (when it has one)."""

    label: ClassVar[str] = "fluctuation"

    def scores(self, group, stats):
        w = group.consumer[1].weight.detach().to(F64)
        col = (w**2).sum(0) * stats.variance()
        return col[group.columns()].sum(1).cpu()

    def correct(self, group, stats, removed):
        consumer = group.consumer[1]
        if consumer.bias is None or not removed:
            return
        cols = group.columns(removed).reshape(-1).to(consumer.weight.device)
        shift = consumer.weight.detach().to(F64)[:, cols] @ stats.mean()[cols]
        with torch.no_grad():
            consumer.bias.add_(shift.to(consumer.bias.dtype))


def _group_matrix(group: Coupled, grad: bool = False) -> torch.Tensor:
    """The group's coupled weights (or their gradients), one row per structure: its producer
    rows (weights, then biases) and its consumer columns, ``[count, per structure]``, float64."""
    parts = []
    all_ = list(range(group.count))
    for _, p in group.producers:
        rows = group.rows(p, all_).to(p.weight.device)
        for t in (p.weight, p.bias):
            if t is None:
                continue
            src = t.grad if grad else t
            parts.append(src.detach().index_select(0, rows).to(F64).reshape(group.count, -1))
    c = group.consumer[1].weight
    src = (c.grad if grad else c).detach().to(F64)
    cols = src[:, group.columns().reshape(-1).to(src.device)]
    parts.append(cols.reshape(c.shape[0], group.count, -1).transpose(0, 1).reshape(group.count, -1))
    return torch.cat([t.cpu() for t in parts], 1)


def _write_group_matrix(group: Coupled, m: torch.Tensor) -> None:
    """Write ``m`` (the layout of :func:`_group_matrix`) back into the group's weights."""
    all_ = list(range(group.count))
    at = 0
    with torch.no_grad():
        for _, p in group.producers:
            rows = group.rows(p, all_).to(p.weight.device)
            for t in (p.weight, p.bias):
                if t is None:
                    continue
                shape = (rows.numel(), *t.shape[1:])
                n = math.prod(shape) // group.count
                block = m[:, at : at + n].reshape(shape)
                t.index_copy_(0, rows, block.to(device=t.device, dtype=t.dtype))
                at += n
        c = group.consumer[1].weight
        cols = group.columns().reshape(-1).to(c.device)
        block = (
            m[:, at:].reshape(group.count, c.shape[0], -1).transpose(0, 1).reshape(c.shape[0], -1)
        )
        c[:, cols] = block.to(device=c.device, dtype=c.dtype)


class _Gradients:
    """Calibration gradients of one group's coupled weights: ``samples`` (``[m, count, per
    structure]``, float32) for the Fisher part, or only their ``mean`` for the Taylor part."""

    def __init__(self, keep_samples: bool):
        self.keep_samples = keep_samples
        self.samples: list[torch.Tensor] = []
        self.total = None
        self.n = 0

    def add(self, g: torch.Tensor) -> None:
        if self.keep_samples:
            self.samples.append(g.to(torch.float32))
        self.total = g if self.total is None else self.total + g
        self.n += 1

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.samples).to(F64)


def fisher_remove(
    w: torch.Tensor, g: torch.Tensor, remove: int, rel_damp: float = 0.01
) -> tuple[torch.Tensor, list[int], list[float]]:
    """Greedy structured OBS under the empirical Fisher ``F = lambda I + (1/m) G^T G``.

    ``w``: ``[count, s]`` (a structure per row), ``g``: ``[m, count, s]`` gradient samples;
    ``lambda = rel_damp`` times the mean of ``F``'s diagonal without it. One structure at a time:
    the one of least ``rho_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q`` goes and the others' weights move by
    the OBS update ``F_RR^-1 F_RQ w_Q`` (the least-squares optimum of the quadratic model with
    ``w_Q`` set to 0); then ``F`` is restricted to what remains. Everything stays in the ``m``
    dimensions of the gradients (Woodbury): with ``B = lambda I + G_A G_A^T / m`` over the remaining
    structures ``A``, ``rho_Q = lambda/2 (|w_Q|^2 + u^T (B - G_Q G_Q^T / m)^-1 u)`` and
    ``delta_R = G_R^T (B - G_Q G_Q^T / m)^-1 u / sqrt(m)``, ``u = G_Q w_Q / sqrt(m)``.

    Returns the corrected weights (removed rows zero), the removed structures in order and the
    error of each removal."""
    w = w.to(F64)
    m, count, s = g.shape
    gh = g.to(F64) / math.sqrt(m)
    lam = rel_damp * float((gh**2).sum()) / (count * s)
    if not lam > 0:
        lam = rel_damp  # all gradients zero: the magnitude order
    eye = torch.eye(m, dtype=F64)
    per = torch.einsum("aks,bks->kab", gh, gh)  # G_Q G_Q^T / m per structure, [count, m, m]
    b = lam * eye + per.sum(0)
    # every structure's u = G_Q w_Q / sqrt(m) and |w_Q|^2, kept up to date in m dimensions: an
    # update delta_R = G_R^T t moves u_Q by per_Q t and |w_Q|^2 by 2 t.u_Q + t^T per_Q t, so no
    # step touches the s weights of each structure (the weights move once, at the end, by the
    # sum of the steps' t: every structure still there at the end was there at every step)
    u = torch.einsum("aks,ks->ka", gh, w)
    wsq = (w**2).sum(1)
    moved = torch.zeros(m, dtype=F64)
    alive = torch.ones(count, dtype=torch.bool)
    removed, errors = [], []
    for _ in range(remove):
        idx = alive.nonzero().squeeze(1)
        sol = torch.linalg.solve(b - per[idx], u[idx].unsqueeze(-1)).squeeze(-1)
        rho = 0.5 * lam * (wsq[idx] + (u[idx] * sol).sum(1))
        j = int(torch.argmin(rho))
        q, t = int(idx[j]), sol[j]
        b = b - per[q]
        alive[q] = False
        pt = per @ t  # [count, m]
        wsq = wsq + 2 * (u @ t) + (pt @ t)
        u = u + pt
        moved += t
        removed.append(q)
        errors.append(float(rho[j]))
    w = w + torch.einsum("aks,a->ks", gh, moved)
    w[~alive] = 0
    return w, removed, errors


@dataclass(frozen=True)
class FisherOBS(StructuredChooser):
    """Greedy structured OBS on the empirical Fisher of the group's coupled weights
    (:func:`fisher_remove`), from ``gradients`` calibration batches' gradients (at most
    ``batches``); ``rel_damp``: ``lambda`` as a fraction of the Fisher's mean diagonal."""

    label: ClassVar[str] = "fisher"
    statistics: ClassVar[str] = "gradients"
    gradients: int = 32
    rel_damp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        checks.positive_int("gradients", self.gradients)
        checks.positive("rel_damp", self.rel_damp)

    @property
    def samples(self) -> int:
        return min(self.gradients, self.batches)

    def choose(self, group, stats, remove):
        w, removed, errors = fisher_remove(
            _group_matrix(group), stats.stacked(), remove, self.rel_damp
        )
        _write_group_matrix(group, w)
        return removed, sum(errors)


@dataclass(frozen=True)
class Taylor(StructuredChooser):
    """``sum |w * g|`` over the structure's coupled weights, ``g`` the mean gradient over the
    calibration batches (the element-wise first-order estimate of the loss change)."""

    label: ClassVar[str] = "taylor"
    statistics: ClassVar[str] = "gradients"
    samples: ClassVar[int] = 0  # the mean only

    def scores(self, group, stats):
        return (_group_matrix(group) * stats.mean()).abs().sum(1)


def _coupled_numel(group: Coupled) -> int:
    """How many weights :func:`_group_matrix` holds for ``group``."""
    n = group.consumer[1].weight.shape[0] * group.count * group.width
    for _, p in group.producers:
        rows = group.rows(p, [0]).numel() * group.count
        n += rows * p.weight[0].numel() + (rows if p.bias is not None else 0)
    return n


def _scalar_loss(out, label: str) -> torch.Tensor:
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"structured {label}: loss_fn must return the loss (a scalar tensor, or an output "
            "with .loss: give the batches labels)"
        )
    return loss


def _collect_gradients(model, data, loss_fn, groups, part, progress) -> list[_Gradients]:
    """Per group, the gradients of its coupled weights on the calibration batches (the first
    ``part.samples`` kept one by one for the Fisher part); the model's ``.grad`` restored."""
    samples = getattr(part, "samples", 0)
    per = sum(_coupled_numel(g) for g in groups)
    need = per * (4 * samples + 8)
    free = checks.available_bytes(torch.device("cpu"))
    if free is not None and need > free // 2:
        raise MemoryError(
            f"structured {part.label}: {samples} gradient samples of the structures' weights need "
            f"{need / 2**30:.1f} GiB, more than half the free memory ({free / 2**30:.1f} GiB): "
            "pass fewer gradients"
        )
    out = [_Gradients(keep_samples=samples > 0) for _ in groups]
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    limit = samples if samples > 0 else part.batches
    try:
        for k, batch in enumerate(tqdm(data, desc="gradients", disable=not progress, leave=False)):
            if k >= limit:
                break
            for p in params:
                p.grad = None
            with torch.enable_grad():
                _scalar_loss(loss_fn(model, batch), part.label).backward()
            for g, store in zip(groups, out):
                store.add(_group_matrix(g, grad=True))
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
    if out and out[0].n == 0:
        raise ValueError("data yielded no batches: pass a re-iterable of calibration batches")
    return out


#: the structured choosers by name
CHOOSERS = {
    c.label: c
    for c in (StructuredOBS, StructureNorm, ActivationNorm, Fluctuation, FisherOBS, Taylor)
}


def chooser(method) -> StructuredChooser:
    """A structured chooser from a part or a name of :data:`CHOOSERS`."""
    if isinstance(method, StructuredChooser):
        return method
    if isinstance(method, str) and method in CHOOSERS:
        return CHOOSERS[method]()
    checks.one_of("structured method", method, sorted(CHOOSERS))
    raise AssertionError  # one_of raised


class _Moments:
    """Forward hook on one consumer: ``sum x``, ``sum x^2`` and (when asked) ``sum x x^T``."""

    def __init__(self, module, full: bool):
        self.full, self.n = full, 0
        self.s1 = self.s2 = self.xx = None
        self.handle = module.register_forward_hook(lambda m, a, o: self._add(a[0]))

    def _add(self, x):
        x = x.detach().reshape(-1, x.shape[-1]).to(F64)
        s1, s2 = x.sum(0), (x * x).sum(0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        if self.full:
            xx = x.T @ x
            self.xx = xx if self.xx is None else self.xx + xx
        self.n += x.shape[0]

    def mean(self):
        return self.s1 / self.n

    def square(self):
        return self.s2 / self.n

    def variance(self):
        return (self.square() - self.mean() ** 2).clamp_min(0)

    def hessian(self):  # 2/N X^T X, as the layer-wise statistics
        return self.xx * (2.0 / self.n)

    def remove(self):
        self.handle.remove()


@dataclass
class StructuredReport:
    """What a structured pruning call did."""

    method: str
    #: fraction of each kind removed per block (the target) and the kept sizes per block
    targets: dict
    sizes: dict
    params_before: int
    params_after: int
    estimated_error: float
    seconds: float
    batches: int
    groups: list = field(default_factory=list)
    #: the estimated error of each group (same order as ``groups``)
    errors: list = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        return self.params_after / self.params_before


def _removals(groups: list[Coupled], targets: dict) -> dict[int, int]:
    out = {}
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        frac = targets.get(g.kind, 0.0)
        if isinstance(frac, (list, tuple)):  # one fraction per block, in block order
            k = seen[g.kind] = seen.get(g.kind, -1) + 1
            if len(frac) != sum(x.kind == g.kind for x in groups):
                raise ValueError(
                    f"{g.kind}: {len(frac)} per-block fractions for "
                    f"{sum(x.kind == g.kind for x in groups)} blocks"
                )
            frac = frac[k]
        n = int(round(frac * g.count))
        if n >= g.count:
            raise ValueError(
                f"{g.kind}={frac} removes all {g.count} {g.kind} of block {g.block}; at least "
                "one must remain in each block"
            )
        out[i] = n
    return out


def check_targets(targets: dict) -> dict:
    """``{"heads": fraction, "neurons": fraction}``, each in ``[0, 1)``, or a list of one fraction
    per block (in block order); one line otherwise."""
    out = {}
    for kind, frac in targets.items():
        checks.one_of("structure", kind, KINDS)
        if isinstance(frac, (list, tuple)):
            out[kind] = [checks.in_range(kind, f, 0.0, 1.0, "[)") for f in frac]
        else:
            out[kind] = checks.in_range(kind, frac, 0.0, 1.0, "[)")
    if not any(out.values()):
        raise ValueError("structured pruning: give a fraction of heads or neurons to remove (> 0)")
    return out


def _calibration(data, batches: int):
    """The first ``batches`` of ``data`` replayed at every pass, and its first batch (to trace)."""
    data = layerwise._Limited(stages.Replayed(data), batches)
    first = next(iter(data), None)
    if first is None:
        raise ValueError("data yielded no batches: pass a re-iterable of calibration batches")
    return data, first


def run(model, data, loss_fn, targets: dict[str, float], method="obs", progress=True):
    """Remove ``targets`` (``{"heads": 0.5, "neurons": 0.3}``: the fraction removed in every block)
    from ``model`` in place with ``method`` (a :class:`StructuredChooser` or its name); returns a
    :class:`StructuredReport`. ``loss_fn(model, batch)`` is called for its forward pass only,
    except by the gradient parts (:class:`FisherOBS`, :class:`Taylor`), which also take its
    gradient on the model as it is before any removal."""
    start = time.perf_counter()
    part = chooser(method)
    targets = check_targets(targets)
    before = sum(p.numel() for p in model.parameters())
    data, first = _calibration(data, part.batches)
    was_training = model.training
    model.eval()
    try:
        groups = structures.trace(model, lambda: loss_fn(model, first), kinds=tuple(targets))
        removals = _removals(groups, targets)
        errors = [0.0] * len(groups)
        grads = None
        if part.statistics == "gradients":
            grads = _collect_gradients(model, data, loss_fn, groups, part, progress)
        with torch.no_grad():
            if grads is not None:  # the gradient parts need no block inputs
                batches = _from_gradients(groups, removals, part, errors, grads)
            else:
                batches = _sequential(
                    model, data, loss_fn, groups, removals, part, progress, errors
                )
    finally:
        model.train(was_training)
    after = sum(p.numel() for p in model.parameters())
    return StructuredReport(
        method=part.label,
        targets=targets,
        sizes=structures.sizes(groups),
        params_before=before,
        params_after=after,
        estimated_error=sum(errors),
        seconds=time.perf_counter() - start,
        batches=batches,
        groups=groups,
        errors=errors,
    )


def _from_gradients(groups, removals, part, errors, grads) -> int:
    """Each group chosen from its gradients (taken before any removal), then shrunk."""
    used = grads[0].n if grads else 0
    for i, g in enumerate(groups):
        if removals[i]:
            removed, errors[i] = part.choose(g, grads[i], removals[i])
            grads[i] = None  # its memory back
            structures.shrink(g, sorted(set(range(g.count)) - set(removed)))
    _check_errors(errors)
    return used


def _sequential(model, data, loss_fn, groups, removals, part, progress, errors):
    blocks, _ = structures._repeated_blocks(model)
    per_block: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        per_block.setdefault(g.block, []).append(i)
    first, last = min(per_block), max(per_block)
    inputs = layerwise._capture(model, data, loss_fn, blocks[first], progress)
    for b in tqdm(range(first, last + 1), desc=f"structured {part.label}", disable=not progress):
        block = blocks[b]
        for i in per_block.get(b, []):
            g, remove = groups[i], removals[i]
            if remove == 0:
                continue
            stats = _Moments(g.consumer[1], full=part.statistics == "hessian")
            try:
                for a, kw in inputs:
                    block(*a, **kw)
            finally:
                stats.remove()
            removed, errors[i] = part.choose(g, stats, remove)
            structures.shrink(g, sorted(set(range(g.count)) - set(removed)))
        if b < last:
            inputs = [layerwise._run_block(block, a, kw) for a, kw in inputs]
    _check_errors(errors)
    return len(inputs)


def _check_errors(errors):
    if not all(math.isfinite(e) for e in errors):
        raise ValueError(
            "structured pruning: the estimated error is not finite (NaN or infinite activations "
            "in the calibration data?)"
        )


def error_curves(model, data, loss_fn, kinds=KINDS, *, rel_damp=0.01, batches=128, progress=True):
    """``{kind: [per block: cumulative error of removing 0, 1, ... structures]}``: the greedy
    structured OBS curves of every coupled group, on the dense model's calibration statistics (one
    pass, every consumer at once). They price each size for :func:`plan_sizes`."""
    data, first = _calibration(data, batches)
    was_training = model.training
    model.eval()
    try:
        groups = structures.trace(model, lambda: loss_fn(model, first), kinds=tuple(kinds))
        stats = [_Moments(g.consumer[1], full=True) for g in groups]
        try:
            with torch.no_grad():
                for batch in tqdm(data, desc="error curves", disable=not progress, leave=False):
                    loss_fn(model, batch)
        finally:
            for s in stats:
                s.remove()
    finally:
        model.train(was_training)
    curves: dict[str, list] = {}
    for g, s in zip(groups, stats):
        w = g.consumer[1].weight.detach().to(F64)
        res = structured_obs.remove_structures(
            w, s.hessian(), g.columns().to(w.device), g.count - 1, rel_damp=rel_damp
        )
        curves.setdefault(g.kind, []).append([0.0, *res.errors])
    return curves


@dataclass(frozen=True)
class SizePlan:
    """Structures kept per block, the removal fractions that give them, the plan's cost and the
    summed error of its sizes."""

    kept: dict
    targets: dict
    cost: float
    error: float


def plan_sizes(curves: dict, options: dict, cost, budget: float) -> SizePlan:
    """The sizes (one per kind, the same in every block) of least summed curve error whose
    ``cost(kept)`` is at most ``budget``. ``options``: ``{kind: [counts kept that may be chosen]}``
    (the levels of a latency table); a kind absent from ``curves`` stays whole."""
    kinds = [k for k in KINDS if k in curves]
    full = {k: len(curves[k][0]) for k in kinds}  # a curve has count entries: 0 .. count-1 removed
    best = None
    grids = [sorted(options.get(k, range(1, full[k] + 1))) for k in kinds]
    for combo in _product(grids):
        kept = dict(zip(kinds, combo))
        c = cost(kept)
        if c > budget:
            continue
        err = sum(curve[full[k] - kept[k]] for k in kinds for curve in curves[k])
        if best is None or (err, c) < (best.error, best.cost):
            targets = {k: (full[k] - kept[k]) / full[k] for k in kinds}
            best = SizePlan(kept, targets, c, err)
    if best is None:
        smallest = {k: min(g) for k, g in zip(kinds, grids)}
        raise ValueError(
            f"the target cannot be met: the smallest sizes ({_describe(smallest)} per block) "
            f"cost {cost(smallest):.4g}, above the budget {budget:.4g}"
        )
    return best


def plan_block_sizes(
    curves: dict, latency: dict, dense_ms: float, budget: float, units: int = 2000
) -> SizePlan:
    """Sizes chosen per block (the same kind may keep more in one block than in another): the
    least summed curve error whose predicted latency is at most ``budget`` ms.

    ``latency``: ``{kind: {kept: ms}}``, the whole model's latency when every block keeps
    ``kept`` of that kind and the rest whole (the measured table). A block's share of a size's
    saving is ``(dense_ms - latency[kind][kept]) / blocks``, so the prediction equals
    :func:`plan_sizes`' when every block keeps the same. The choice is a multiple-choice knapsack
    over (block, kind) pairs, solved exactly by dynamic programming on the saving rounded down to
    ``units`` steps of the saving needed (so the plan never predicts above ``budget``).
    ``kept`` and ``targets`` of the plan hold one value per block."""
    kinds = [k for k in KINDS if k in curves]
    need = dense_ms - budget
    pairs = [(k, b) for k in kinds for b in range(len(curves[k]))]
    if need <= 0:
        kept = {k: [len(c) for c in curves[k]] for k in kinds}
        return SizePlan(kept, {k: [0.0] * len(curves[k]) for k in kinds}, dense_ms, 0.0)

    def saving(kind, kept):
        return (dense_ms - latency[kind][kept]) / len(curves[kind])

    inf = math.inf
    # best[j]: (error, choices) reaching a rounded saving of at least j units (capped at units)
    best = [(0.0, ())] + [(inf, ())] * units
    for kind, b in pairs:
        curve = curves[kind][b]
        full = len(curve)
        nxt = [(inf, ())] * (units + 1)
        for kept in sorted(latency[kind]):
            if not 1 <= kept <= full:
                continue
            err = curve[full - kept]
            step = int(math.floor(saving(kind, kept) / need * units))
            for j, (e, ch) in enumerate(best):
                if e == inf:
                    continue
                t = min(units, j + max(step, 0))
                if e + err < nxt[t][0]:
                    nxt[t] = (e + err, (*ch, kept))
        best = nxt
    if best[units][0] == inf:
        smallest = {k: min(latency[k]) for k in kinds}
        cost = dense_ms - sum(saving(k, smallest[k]) * len(curves[k]) for k in kinds)
        raise ValueError(
            f"the target cannot be met: the smallest sizes ({_describe(smallest)} per block) "
            f"cost {cost:.4g}, above the budget {budget:.4g}"
        )
    error, choices = best[units]
    kept: dict = {k: [] for k in kinds}
    for (kind, _), v in zip(pairs, choices):
        kept[kind].append(v)
    cost = dense_ms - sum(saving(k, v) for k in kinds for v in kept[k])
    targets = {k: [(len(c) - v) / len(c) for c, v in zip(curves[k], kept[k])] for k in kinds}
    return SizePlan(kept, targets, cost, error)


def _product(grids):
    if not grids:
        yield ()
        return
    for head in grids[0]:
        for rest in _product(grids[1:]):
            yield (head, *rest)


def _describe(kept: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in kept.items())


def gradual_targets(final: dict, dense: dict, current: dict, progress: float) -> dict:
    """What to remove at one point of a gradual schedule: ``{kind: [per block: fraction of the
    structures it has now]}`` so that each block has removed ``round(progress * f * dense)`` of
    its dense structures, ``f`` its final fraction (``final[kind]``: one fraction, or one per
    block). At ``progress`` 1 the counts are those the same targets remove at once. ``dense`` and
    ``current``: ``{kind: [per block: structures]}`` (:func:`structures.sizes`). Kinds and blocks
    with nothing to remove now get 0; ``{}`` when nothing is due anywhere."""
    out: dict = {}
    for kind, frac in final.items():
        blocks = len(dense[kind])
        fracs = list(frac) if isinstance(frac, (list, tuple)) else [frac] * blocks
        if len(fracs) != blocks:
            raise ValueError(f"{kind}: {len(fracs)} per-block fractions for {blocks} blocks")
        now = []
        for f, d, c in zip(fracs, dense[kind], current[kind]):
            goal = d - int(round(progress * int(round(f * d))))  # structures kept at this point
            now.append((c - goal) / c if c > goal else 0.0)
        out[kind] = now
    return out if any(x for v in out.values() for x in v) else {}


def count(model, data, loss_fn, kinds=KINDS) -> dict:
    """``{kind: [per block: structures]}`` of ``model`` as it is now (one traced forward pass on
    the first batch of ``data``)."""
    _, first = _calibration(data, 1)
    was_training = model.training
    model.eval()
    try:
        groups = structures.trace(model, lambda: loss_fn(model, first), kinds=tuple(kinds))
    finally:
        model.train(was_training)
    return structures.sizes(groups)


#: how whole blocks are chosen: ``loss`` greedy on the calibration loss with each candidate
#: bypassed (measured, no approximation), ``angular`` the blocks whose output is closest in angle
#: to their input (one pass)
LAYER_METHODS = ("loss", "angular")


class _Bypass:
    """While active, the forward of ``block`` returns its input hidden states in place of its
    output (the residual stream skips it)."""

    def __init__(self, block):
        self.handle = block.register_forward_hook(self._hook, with_kwargs=True)

    @staticmethod
    def _hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    def remove(self):
        self.handle.remove()


def _mean_loss(model, data, loss_fn) -> float:
    total, n = 0.0, 0
    for batch in data:
        total += float(_scalar_loss(loss_fn(model, batch), "layers"))
        n += 1
    return total / max(n, 1)


def layer_scores(model, data, loss_fn, batches: int = 16) -> list[float]:
    """Per block, the mean angular distance ``arccos(cos(x_in, x_out)) / pi`` between its input
    and output hidden states over the calibration tokens (a block that barely turns the residual
    stream scores near 0)."""
    blocks, _ = structures._repeated_blocks(model)
    data, _ = _calibration(data, batches)
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)

    def hook(i):
        def fn(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.flatten(0, -2), y.flatten(0, -2), dim=-1)
            sums[i] += float(torch.arccos(cos.clamp(-1, 1)).sum() / math.pi)
            counts[i] += cos.numel()

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in data:
                loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def _greedy(model, data, loss_fn, candidates: list, count: int, make):
    """One at a time, the candidate whose ``make(candidate)`` (a hook, active until its
    ``remove()``) gives the least mean calibration loss, with those chosen before active too;
    returns the chosen indices, their losses and the hook of each choice's own trial (removed)."""
    chosen, losses, trials, active = [], [], [], []
    try:
        with torch.no_grad():
            for _ in range(count):
                trial, hooks = {}, {}
                for i in [i for i in range(len(candidates)) if i not in chosen]:
                    hooks[i] = make(candidates[i])
                    try:
                        trial[i] = _mean_loss(model, data, loss_fn)
                    finally:
                        hooks[i].remove()
                best = min(trial, key=trial.get)
                chosen.append(best)
                losses.append(trial[best])
                trials.append(hooks[best])
                active.append(make(candidates[best]))
    finally:
        for hook in active:
            hook.remove()
    return chosen, losses, trials


def choose_layers(model, data, loss_fn, count: int, method: str = "loss", batches: int = 16):
    """The ``count`` blocks to remove (indices among the current blocks) and the score of each
    choice: ``loss``: one at a time, the block whose bypass gives the least mean calibration loss
    (with those chosen before bypassed too); ``angular``: the ``count`` least angular distances
    (:func:`layer_scores`)."""
    checks.one_of("layer_method", method, LAYER_METHODS)
    blocks, _ = structures._repeated_blocks(model)
    if not 0 < count < len(blocks):
        raise ValueError(
            f"layers: {count} of {len(blocks)} blocks cannot be removed (at least one must remain)"
        )
    was_training = model.training
    model.eval()
    try:
        if method == "angular":
            scores = layer_scores(model, data, loss_fn, batches)
            order = sorted(range(len(blocks)), key=scores.__getitem__)[:count]
            return order, [scores[i] for i in order]
        data, _ = _calibration(data, batches)
        chosen, losses, _ = _greedy(model, data, loss_fn, list(blocks), count, _Bypass)
        return chosen, losses
    finally:
        model.train(was_training)


def drop_layers(model, data, loss_fn, count: int, method: str = "loss", batches: int = 16):
    """Remove ``count`` whole blocks chosen by :func:`choose_layers` (no correction of the
    others); returns ``{"removed": [...], "scores": [...], "blocks": left, "seconds": ...}``."""
    start = time.perf_counter()
    removed, scores = choose_layers(model, data, loss_fn, count, method, batches)
    left = structures.drop_blocks(model, removed)
    return {"method": method, "removed": sorted(removed), "order": removed, "scores": scores,
            "blocks": left, "seconds": time.perf_counter() - start}  # fmt: skip


#: the whole modules inside a block that can be removed, by the kind of their structures
MODULE_KINDS = {"attention": structures.HEADS, "feed_forward": structures.NEURONS}


class _Silence:
    """While active, the module of ``group`` (its block's attention or feed-forward) gives what
    it gives once removed (:func:`structures.remove_module`): its output projection's bias, or
    zeros, in place of its output; counts the items of the module's output (``outputs``)."""

    def __init__(self, group):
        self.group, self.outputs, self.cache_slots = group, 0, ()
        consumer = group.consumer[1]
        if group.kind == structures.HEADS and not structures._inside(group.owner, consumer):
            # the attention's context goes to zero: the output projection outside gives its bias
            self.handle = group.owner.register_forward_hook(self._context)
        elif group.kind == structures.HEADS:
            self.handle = group.owner.register_forward_hook(self._output)
        else:  # a feed-forward: no input left to its output projection
            self.handle = consumer.register_forward_hook(self._projection)

    def _bias(self, like):
        bias = self.group.consumer[1].bias
        return torch.zeros_like(like) if bias is None else torch.zeros_like(like) + bias

    def _context(self, module, args, out):
        self.outputs = len(out) if isinstance(out, tuple) else 0
        first = out[0] if isinstance(out, tuple) else out
        return (torch.zeros_like(first), *out[1:]) if isinstance(out, tuple) else first * 0

    def _output(self, module, args, out):
        self.outputs = len(out) if isinstance(out, tuple) else 0
        if not isinstance(out, tuple):
            return self._bias(out)
        # a key/value cache the module returned (older model code) is passed on as it was
        self.cache_slots = tuple(i for i, o in enumerate(out) if hasattr(o, "get_seq_length"))
        rest = [o if i in self.cache_slots else None for i, o in enumerate(out) if i]
        return (self._bias(out[0]), *rest)

    def _projection(self, module, args, out):
        return self._bias(out)

    def remove(self):
        self.handle.remove()


def choose_modules(model, data, loss_fn, kind: str, count: int, batches: int = 16):
    """The ``count`` blocks whose whole ``kind`` module (``attention``, ``feed_forward``) to
    remove, one at a time: the block whose module, removed, gives the least mean calibration loss
    (with those chosen before removed too; measured, no approximation). Returns the traced
    groups, the chosen indices among them, the losses and the output format of each chosen
    module, ``(items, cache slots)`` (for :func:`structures.remove_module`)."""
    checks.one_of("module", kind, tuple(MODULE_KINDS))
    data, first = _calibration(data, batches)
    groups = structures.trace(model, lambda: loss_fn(model, first), kinds=(MODULE_KINDS[kind],))
    if not 0 < count <= len(groups):
        raise ValueError(
            f"{kind}_modules: {count} cannot be removed: the model has {len(groups)} "
            f"{kind.replace('_', '-')} modules left"
        )
    was_training = model.training
    model.eval()
    try:
        chosen, losses, trials = _greedy(model, data, loss_fn, groups, count, _Silence)
    finally:
        model.train(was_training)
    return groups, chosen, losses, [(t.outputs, t.cache_slots) for t in trials]


def drop_modules(model, data, loss_fn, kind: str, count: int, batches: int = 16) -> dict:
    """Remove the whole ``kind`` module (``attention`` or ``feed_forward``) of ``count`` blocks
    chosen by :func:`choose_modules` (no correction of the rest): a removed feed-forward keeps
    zero neurons (its output projection gives its bias), a removed attention is replaced by
    :class:`structures.Silent`. Returns ``{"kind", "removed": blocks, "losses", "modules":
    {name: spec of each replaced attention}, "seconds"}``."""
    start = time.perf_counter()
    groups, chosen, losses, outputs = choose_modules(model, data, loss_fn, kind, count, batches)
    modules = {}
    for i, (n, slots) in zip(chosen, outputs):
        name = structures.remove_module(model, groups[i], n, slots)
        if name is not None:
            modules[name] = model.get_submodule(name).spec()
    return {"kind": kind, "removed": sorted(groups[i].block for i in chosen),
            "order": [groups[i].block for i in chosen], "losses": losses, "modules": modules,
            "seconds": time.perf_counter() - start}  # fmt: skip
