"""One-shot pruning of any ``torch.nn.Module``: the engine that runs a method's parts.

A method (:mod:`curvature.pruning.registry`) is a curvature part and a solver part; the call adds a
mask structure (``mask=``) and an allocation (``global_sparsity=``). One pruning step runs the
stages of :mod:`curvature.pruning.stages`:

1. choose the parameters (:class:`~curvature.pruning.targets.Target`) and check they fit the mask;
2. plan memory: split the targets into groups whose curvature fits the budget;
3. per group, collect gradients and build the curvature (for OBS: ``num_grads`` gradients, one per
   batch of ``data``, streamed into a block-diagonal :class:`~curvature.FisherInverse`), then
   order each block's groups and cost each step (the solver);
4. allocate the global (or per-layer) target across blocks by those costs;
5. correct the kept weights (the solver's update) and set the pruned ones exactly to zero.

When the curvature of all targets does not fit the memory budget, the targets are split into
groups. Gradients are then recomputed per group from the same batches (the data's shuffling
generators are replayed, see :class:`~curvature.pruning.stages.ReplayableData`), never from a
partly pruned model: every group's curvature is built and scored before any weight changes, and
the curvature of all groups but the last waits on disk (memory-mapped) for the update stage. The
answer is the same as without a split; the cost is one gradient pass per group.

``num_recomputations > 1`` splits the step into equal sparsity increments and re-collects the
gradients after each (the Fisher then describes the partly pruned model).

Under an initialised ``torch.distributed`` process group of several processes, ``prune`` is called
on every rank with that rank's shard of the batches: the gradient methods split the ``num_grads``
gradients across ranks and shard the Fisher blocks (:mod:`curvature.pruning.distributed`), the
layer-wise methods sum every rank's calibration statistics, and every rank ends with the same
model, masks and report (its ``memory_plan`` is the rank's own).
"""

from __future__ import annotations

import functools
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from curvature.core.checks import available_bytes
from curvature.pruning import distributed, layerwise, stages
from curvature.pruning.allocation import Allocation, GlobalThreshold, LayerTargets
from curvature.pruning.curvatures import Curvature, EmpiricalFisher, LayerHessian
from curvature.pruning.masks import MaskSet, MaskStructure, check_param_fits
from curvature.pruning.params import select_params
from curvature.pruning.registry import METHODS, resolve
from curvature.pruning.settings import PruneSettings
from curvature.pruning.solvers import KeepMask, Solver
from curvature.pruning.targets import Target


@dataclass
class PruneReport:
    """What a pruning call did."""

    method: str
    mask: str
    selection: str
    target_sparsity: float
    global_sparsity: float  # reached, over the selected parameters
    param_sparsity: dict[str, float]
    estimated_loss_increase: float | None  # sum of the OBS costs of the pruned groups
    num_grads: int  # gradients per Fisher (requested)
    seconds: float
    # distinct batches behind them: fewer than num_grads when the data was cycled
    distinct_batches: int | None = None
    # parameters a ``re:`` pattern matched but that were left out, with the reason
    skipped: dict[str, str] = field(default_factory=dict)
    memory_groups: int = 1  # groups of parameters whose curvature was built at once (most per step)
    memory_plan: dict = field(default_factory=dict)  # bytes of each large buffer (largest step)
    #: seconds of each phase (layer-wise: ``calibration`` forward passes and ``solve``)
    phases: dict = field(default_factory=dict)
    #: fixed-mask reconstruction: damped layer errors summed before and after, the most
    #: iterations and the largest final relative residual (``None`` without it)
    reconstruction: dict | None = None
    #: the outlier allocation's target of each parameter (``None`` without it)
    allocation: dict | None = None
    masks: MaskSet = field(repr=False, default_factory=MaskSet)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "masks"}
        return d


def collect_fisher(model, data, loss_fn, targets, settings: PruneSettings):
    """Stream ``settings.num_grads`` gradients (one per batch, cycling over ``data``) into the
    Fisher inverses of ``targets`` (:class:`~curvature.pruning.targets.Target`): stages 1 and 2
    of the engine. Returns ``{name: FisherInverse}``."""
    grads = stages.collect_gradients(
        model, data, loss_fn, targets, num_grads=settings.num_grads, progress=settings.progress
    )
    built = EmpiricalFisher().build(targets, grads, settings)
    return {n: b.fisher for n, b in built.items()}


def prune(
    model: torch.nn.Module,
    data: Iterable,
    *,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    sparsity: float,
    method: str = "obs",
    mask: str = "unstructured",
    params: str | list[str] = "__ALL_PRUNABLE__",
    num_grads: int = 1024,
    block_size: int = 50,
    damp: float = 1e-7,
    num_recomputations: int = 1,
    selection: str = "greedy",
    global_sparsity: bool | None = None,
    masks: MaskSet | None = None,
    fisher_dtype: torch.dtype = torch.float64,
    max_memory: int | None = None,
    progress: bool = True,
    layer_damp: float = 0.01,
    sequential: bool | None = None,
    reconstruct: bool = False,
    reconstruct_tol: float = 1e-3,
    reconstruct_iters: int = 100,
    allocation: str = "default",
    outlier_m: float = 5.0,
    outlier_lambda: float = 0.08,
    objective: str = "plain",
    fisher_mix: float = 0.5,
    fisher_token_mix: float = 0.0,
) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` and return a :class:`PruneReport`.

    Args:
        model: any module; its selected weights are overwritten.
        data: a re-iterable of batches (a list or a ``DataLoader``); one gradient per batch.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        sparsity: target fraction of zeros over the selected parameters, in ``[0, 1)``
            (for ``N:M`` masks it must be ``1 - N/M``); or a mapping ``{parameter name:
            sparsity}``, a target per parameter (``params`` is then those names).
        method: a registered method (``curvature.pruning.METHODS.names()``): ``"obs"``,
            ``"obs-independent"``, ``"mfac"``, ``"magnitude"``, or the layer-wise
            ``"sparsegpt"``, ``"obc"`` and ``"wanda"`` (:mod:`curvature.pruning.layerwise`:
            ``data`` is then the calibration set, read by forward passes of ``loss_fn``).
        mask: ``"unstructured"``, ``"block4"`` or ``"N:M"`` such as ``"2:4"``.
        params: names, ``re:`` patterns or ``__ALL_PRUNABLE__``.
        num_grads, block_size, damp: the empirical Fisher (``block_size`` must be a multiple of
            the mask's group).
        num_recomputations: split the step and re-collect gradients in between.
        selection: the OBS solver of ``"obs"``/``"mfac"``: ``"greedy"`` (exact one-at-a-time OBS
            inside each block) or ``"independent"`` (oBERT: score once, prune together, sum the
            corrections).
        global_sparsity: one threshold across all parameters (``True``, the default of the
            gradient and magnitude methods) or the target per layer (``False``, the only choice of
            the layer-wise methods).
        masks: weights pruned earlier (kept pruned; counted toward the target).
        fisher_dtype: storage dtype of the Fisher blocks (float64; float32 halves the memory).
        max_memory: bytes the Fisher blocks may take (default: 60% of the available memory).
        layer_damp: layer-wise methods: ``H`` damped by this fraction of its mean diagonal.
        sequential: layer-wise methods: calibrate each block on the outputs of the pruned blocks
            before it (default) or every layer from the dense model (``False``).
        reconstruct: after the mask is chosen, re-solve the kept weights of every linear layer
            for it (least squares on the layer inputs, :mod:`curvature.pruning.reconstruct`):
            inside the layer-wise pass, or as one more sequential calibration pass after any
            other method. ``reconstruct_tol`` (relative residual) and ``reconstruct_iters``
            bound the conjugate-gradient solve.
        allocation: ``"default"`` (the method's: global threshold or the target per layer) or
            ``"outlier"``: each block's target from its share of outlier activation scores,
            within ``sparsity +- outlier_lambda`` and averaging to ``sparsity``
            (:func:`curvature.pruning.layerwise.outlier_sparsities`; ``outlier_m``: a score is an
            outlier above ``outlier_m`` times its block's mean).
        objective: ``"plain"`` or ``"fisher"``: the layer objective weighted by the gradient
            Fisher of each layer's outputs (:mod:`curvature.pruning.fisher_objective`), mixed
            with uniform weights by ``fisher_mix`` (output rows) and ``fisher_token_mix``
            (tokens, off by default); for the layer-wise methods and reconstruct.

    ``method`` may add parts by name: ``"sparsegpt+reconstruct+outlier+fisher"`` is
    ``method="sparsegpt", reconstruct=True, allocation="outlier", objective="fisher"``.
    """
    if isinstance(sparsity, dict):
        params = list(sparsity)
    settings = PruneSettings(
        sparsity=sparsity,
        method=method,
        mask=mask,
        params=params,
        num_grads=num_grads,
        block_size=block_size,
        damp=damp,
        num_recomputations=num_recomputations,
        selection=selection,
        global_sparsity=global_sparsity,
        fisher_dtype=fisher_dtype,
        max_memory=max_memory,
        progress=progress,
        layer_damp=layer_damp,
        sequential=sequential,
        reconstruct=reconstruct,
        reconstruct_tol=reconstruct_tol,
        reconstruct_iters=reconstruct_iters,
        allocation=allocation,
        outlier_m=outlier_m,
        outlier_lambda=outlier_lambda,
        objective=objective,
        fisher_mix=fisher_mix,
        fisher_token_mix=fisher_token_mix,
    )
    return run(model, data, loss_fn, settings, masks=masks)


def run(model, data, loss_fn, settings: PruneSettings, *, masks: MaskSet | None = None):
    """Prune ``model`` as ``settings`` say; the engine behind :func:`prune`."""
    start = time.perf_counter()
    if settings.allocation == "outlier" or (
        settings.reconstruct and not METHODS[settings.method].layerwise
    ):
        report = _run_with_parts(model, data, loss_fn, settings, masks, start)
    else:
        report = _run(model, data, loss_fn, settings, masks, start)
    report.method = settings.spec  # the method with its parts
    return report


def _run_with_parts(model, data, loss_fn, settings, masks, start):
    """The outlier allocation (per-layer targets, then the method) and the reconstruction pass
    after a method that is not layer-wise (its masks kept, its kept weights re-solved)."""
    data = stages.Replayed(data)
    allocated = None
    if settings.allocation == "outlier":
        named = select_params(
            model, settings.params if isinstance(settings.params, str) else list(settings.params)
        )
        lin = layerwise.layer_targets(model, named)
        t0 = time.perf_counter()
        allocated = layerwise.outlier_sparsities(
            model, data, loss_fn, lin, settings.sparsity, settings
        )
        alloc_seconds = time.perf_counter() - t0
        settings = replace(
            settings,
            sparsity=tuple(allocated.items()),
            params=tuple(allocated),
            allocation="default",
        )
    post = settings.reconstruct and not METHODS[settings.method].layerwise
    inner = (
        replace(settings, reconstruct=False, objective="plain", sequential=None)
        if post
        else settings
    )
    if post:  # the dense weights, whose outputs the reconstruction reproduces
        named = select_params(
            model, settings.params if isinstance(settings.params, str) else list(settings.params)
        )
        lin = layerwise.layer_targets(model, named)
        dense = {t.name: t.matrix().to(t.param.dtype) for t in lin}
    report = _run(model, data, loss_fn, inner, masks, start)
    if post:
        dense = {n: w.to(torch.float64) for n, w in dense.items()}
        res = layerwise.run(
            model,
            data,
            loss_fn,
            lin,
            {t.name: report.param_sparsity[t.name] for t in lin},
            KeepMask(),
            LayerHessian(),
            settings,
            report.masks,
            dense=dense,
        )
        report.phases = {
            **report.phases,
            **{f"reconstruct_{k}": v for k, v in res.phases().items()},
        }
        report.reconstruction = res.reconstruction()
        report.seconds = time.perf_counter() - start
        if distributed.active():
            report.seconds = distributed.broadcast_float(report.seconds)
    if allocated is not None:
        report.allocation = allocated
        report.phases = {"outlier_allocation": alloc_seconds, **report.phases}
    return report


def _run(model, data, loss_fn, settings: PruneSettings, masks, start):
    structure = settings.structure
    curvature, solver = resolve(settings.method, settings.selection)
    allocation = GlobalThreshold() if settings.global_sparsity else LayerTargets()
    _refuse_sharded_params(model)
    named, skipped = select_params(
        model,
        settings.params if isinstance(settings.params, str) else list(settings.params),
        with_skipped=True,
    )
    if skipped:
        warnings.warn(
            f"prune: {len(skipped)} parameters matched by a re: pattern were skipped "
            f"({_skip_summary(skipped)}); the list is in report.skipped",
            stacklevel=3,
        )
    if curvature.layerwise:
        report = _run_layerwise(model, data, loss_fn, settings, (curvature, solver), named, masks)
        report.skipped = skipped
        report.seconds = time.perf_counter() - start
        if distributed.active():  # one report on every rank: rank 0's clock, all ranks' batches
            report.seconds = distributed.broadcast_float(report.seconds)
            report.distinct_batches = int(distributed.allreduce_sum(report.distinct_batches or 0))
        return report
    for name, p in named:
        check_param_fits(name, p, structure)
    # a parameter smaller than a block is one block of its own size (a multiple of the mask's run)
    targets = [Target(n, p, min(settings.block_size, p.numel())) for n, p in named]
    masks = masks if masks is not None else MaskSet()
    total = sum(t.numel for t in targets)
    already = sum(int(masks.get(t.name).sum()) for t in targets if t.name in masks)
    s0 = already / total
    r_ = 1 if structure.nm else settings.num_recomputations
    if settings.per_parameter:
        final = settings.targets()
        reached0 = {
            t.name: float(masks.get(t.name).float().mean()) if t.name in masks else 0.0
            for t in targets
        }
        target = sum(final[t.name] * t.numel for t in targets) / total
        steps = [
            {
                n: reached0[n] + (max(final[n], reached0[n]) - reached0[n]) * (r + 1) / r_
                for n in final
            }
            for r in range(r_)
        ]
    else:
        target = settings.sparsity
        steps = [s0 + (max(target, s0) - s0) * (r + 1) / r_ for r in range(r_)]
    budget = _curvature_budget(model, targets, curvature, settings)
    problem = _Problem(model, stages.ReplayableData(data), loss_fn)
    est, groups = 0.0, 1
    for s in steps:
        if isinstance(s, dict):  # a target per parameter: the allocation carries them
            parts = _Parts(curvature, solver, LayerTargets(s), structure)
            s = sum(s[t.name] * t.numel for t in targets) / total
        else:
            parts = _Parts(curvature, solver, allocation, structure)
        e, g = _prune_step(problem, targets, masks, s, parts, settings, budget)
        est, groups = est + e, max(groups, g)
    per = {t.name: float(masks.get(t.name).float().mean()) for t in targets}
    reached = sum(per[t.name] * t.numel for t in targets) / total
    uses_curvature = curvature.needs_gradients
    distinct = problem.data.distinct_batches
    if uses_curvature and distinct is not None and distinct < settings.num_grads:
        warnings.warn(
            f"prune: data has {distinct} batches but num_grads={settings.num_grads}: it was "
            f"read more than once (the same batches again, or a shuffling loader's new batches "
            f"of the same examples); pass at least num_grads batches or lower num_grads",
            stacklevel=3,
        )
    seconds = time.perf_counter() - start
    if distributed.active():  # one report on every rank: rank 0's clock
        seconds = distributed.broadcast_float(seconds)
    return PruneReport(
        method=settings.method,
        mask=structure.name,
        selection=solver.name if uses_curvature else "-",
        target_sparsity=float(target),
        global_sparsity=reached,
        param_sparsity=per,
        estimated_loss_increase=est if uses_curvature else None,
        num_grads=settings.num_grads if uses_curvature else 0,
        seconds=seconds,
        distinct_batches=distinct if uses_curvature else None,
        skipped=skipped,
        memory_groups=groups,
        memory_plan=max((p.as_dict() for p in problem.plans), key=lambda d: d["total"])
        if problem.plans
        else {"curvature": 0},
        phases=dict(problem.phases),
        masks=masks,
    )


def _run_layerwise(model, data, loss_fn, settings, parts, named, masks):
    """The layer-wise methods: :mod:`curvature.pruning.layerwise` prunes each layer to its target."""
    curvature, solver = parts
    targets = layerwise.layer_targets(model, named)
    structure = settings.structure
    for t in targets:  # N:M runs along the input dimension of the layer
        if t.cols % structure.run:
            raise ValueError(
                f"parameter {t.name} has {t.cols} inputs, not divisible by the {structure.name} "
                f"group of {structure.run}; exclude it from params"
            )
    masks = masks if masks is not None else MaskSet()
    per = settings.targets()
    sparsities = {t.name: per.get(t.name, per.get("")) for t in targets}
    res = layerwise.run(
        model, data, loss_fn, targets, sparsities, solver, curvature, settings, masks
    )
    reached = {t.name: float(masks.get(t.name).float().mean()) for t in targets}
    total = sum(t.param.numel() for t in targets)
    return PruneReport(
        method=settings.method,
        mask=structure.name,
        selection=("sequential" if settings.sequential else "parallel"),
        target_sparsity=sum(sparsities[t.name] * t.param.numel() for t in targets) / total,
        global_sparsity=sum(reached[t.name] * t.param.numel() for t in targets) / total,
        param_sparsity=reached,
        estimated_loss_increase=res.estimate,
        num_grads=0,
        seconds=0.0,  # set by run()
        distinct_batches=res.batches,
        memory_groups=1,
        memory_plan={  # the statistics of the largest layer (sequential: one block's at a time)
            "curvature": max(curvature.estimate_bytes(t, settings) for t in targets),
        },
        phases=res.phases(),
        reconstruction=res.reconstruction(),
        masks=masks,
    )


def _refuse_sharded_params(model) -> None:
    """FSDP shards each parameter across ranks: a rank holds a slice of a flattened or ``DTensor``
    parameter, so names and blocks are not the model's. Refused with one line."""
    wrapped = any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())
    dtensor = any(type(p).__name__ == "DTensor" for p in model.parameters())
    if wrapped or dtensor:
        raise ValueError(
            "prune: the model's parameters are sharded by FSDP, which this engine does not "
            "support; prune before wrapping (or inside summon_full_params), or use "
            "DistributedDataParallel, whose replicas the engine prunes across ranks"
        )


def _skip_summary(skipped: dict[str, str]) -> str:
    reasons: dict[str, int] = {}
    for why in skipped.values():
        reasons[why] = reasons.get(why, 0) + 1
    return "; ".join(f"{n} {why}" for why, n in reasons.items())


def _curvature_budget(model, targets, curvature, settings) -> int:
    """Bytes the curvature may take: ``max_memory`` if given; otherwise 60% of the available
    memory less every other buffer the step holds (the memory plan's other terms)."""
    if settings.max_memory is not None:
        return settings.max_memory
    available = available_bytes(targets[0].param.device) or 8 << 30
    others = stages.memory_plan(model, targets, [targets], curvature, settings)
    rest = others.total - others.curvature
    budget = int(0.6 * available) - rest
    if budget <= 0:
        raise MemoryError(
            f"pruning {len(targets)} parameters needs {rest:,} bytes "
            f"besides the curvature, more than 60% of the {available:,} bytes available: prune "
            "fewer parameters at once (params) or free memory"
        )
    return budget


@dataclass(frozen=True)
class _Problem:
    """What the loss is measured on: the model, its data and the loss function."""

    model: torch.nn.Module
    data: Iterable
    loss_fn: Callable
    plans: list = field(default_factory=list)  # the memory plan of each step
    phases: dict = field(default_factory=dict)  # seconds per phase, summed over steps

    def timed(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - since
        return now


@dataclass(frozen=True)
class _Parts:
    curvature: Curvature
    solver: Solver
    allocation: Allocation
    structure: MaskStructure


def _prune_step(problem, targets, masks, sparsity, parts, settings, budget) -> tuple[float, int]:
    """One pruning step to ``sparsity``: the stages of :mod:`curvature.pruning.stages`."""
    if distributed.active() and parts.curvature.needs_gradients:
        return _prune_step_sharded(problem, targets, masks, sparsity, parts, settings, budget)
    structure = parts.structure
    groups = stages.plan_groups(targets, parts.curvature, settings, budget)
    problem.plans.append(
        stages.memory_plan(problem.model, targets, groups, parts.curvature, settings)
    )
    problem.data.new_step()  # recomputations draw fresh batches; groups of one step replay them
    weights, fixed = _weights_and_fixed(targets, masks)

    with tempfile.TemporaryDirectory(prefix="curvature-prune-") as spill:
        built, scored = [], {}
        clock = time.perf_counter()
        for gi, group in enumerate(groups):
            curv = stages.build_curvature(problem, group, parts.curvature, settings)
            clock = problem.timed("gradients and curvature", clock)
            scored.update(
                stages.score(
                    group, weights, fixed, curv, parts.solver, structure, settings.progress
                )
            )
            clock = problem.timed("scores", clock)
            if gi < len(groups) - 1:  # keep it on disk until the update: no second collection
                curv = {
                    t.name: curv[t.name].store(Path(spill) / f"{gi}-{ti}.pt")
                    for ti, t in enumerate(group)
                }
            built.append(curv)
            del curv
        counts = _allocate(targets, scored, sparsity, parts)
        est = 0.0
        for gi, group in enumerate(groups):  # stored groups read back, the last one in memory
            curv = built[gi]
            for t in group:
                order, cost = scored[t.name]
                new, pruned, e = stages.update(
                    t,
                    weights[t.name],
                    curv[t.name],
                    parts.solver,
                    order,
                    cost,
                    counts[t.name],
                    structure,
                )
                est += e
                with torch.no_grad():
                    t.param.copy_(new.flatten()[: t.numel].view_as(t.param).to(t.param.dtype))
                masks.update(t.name, pruned.flatten()[: t.numel].view_as(t.param))
            built[gi] = None
            del curv
    masks.apply(problem.model)
    problem.timed("allocation and update", clock)
    return est, len(groups)


def _prune_step_sharded(problem, targets, masks, sparsity, parts, settings, budget):
    """:func:`_prune_step` across the ranks of the process group.

    Every rank owns a contiguous share of the blocks; when its share's curvature does not fit
    ``budget`` it is split into memory groups as on one process (pieces cut by block ranges),
    and every rank runs as many gradient passes as the rank with the most groups (lockstep:
    every pass is one exchange), keeping the curvature of all groups but the last on disk.
    """
    rank, size = distributed.world()
    structure = parts.structure
    budget = distributed.allreduce_min(budget)  # one plan on every rank: the smallest budget
    need = lambda p: parts.curvature.estimate_bytes(p, settings)  # noqa: E731
    plan = [
        distributed.split_to_fit(pieces, need, budget)
        for pieces in distributed.shard(targets, size)
    ]
    groups = [
        stages.plan_groups(pieces, parts.curvature, settings, budget) if pieces else []
        for pieces in plan
    ]
    passes = max(len(g) for g in groups)
    mine = plan[rank]
    if mine:
        problem.plans.append(
            stages.memory_plan(problem.model, mine, groups[rank], parts.curvature, settings)
        )
    problem.data.new_step()
    counts = [distributed.local_count(settings.num_grads, r, size) for r in range(size)]
    # gradients travel in the widest dtype of the targets (exact for the narrower ones)
    dtype = functools.reduce(torch.promote_types, [t.param.dtype for t in targets])
    weights, fixed = _weights_and_fixed(mine, masks)
    clock = time.perf_counter()
    curv, scored, seen = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="curvature-prune-") as spill:
        for i in range(passes):
            active = [g[i] if i < len(g) else [] for g in groups]
            names = {p.name for pieces in active for p in pieces}
            needed = [t for t in targets if t.name in names]
            local = None
            if counts[rank]:
                local = stages.collect_gradients(
                    problem.model,
                    problem.data.replay(),
                    problem.loss_fn,
                    needed,
                    num_grads=counts[rank],
                    progress=settings.progress and rank == 0,
                    counts=seen,
                )
            grads = distributed.exchange_gradients(
                local or iter(()), active, counts, stages.GRADIENT_BATCH, dtype
            )
            error = None
            try:
                built = parts.curvature.build(
                    [_KeyedPiece(p) for p in active[rank]], _padded(grads, active[rank]), settings
                )
                clock = problem.timed("gradients and curvature", clock)
                for p in active[rank]:
                    scored[p.key] = parts.solver.order(
                        p, weights[p.key], built[p.key], structure, fixed[p.key]
                    )
                    # all but the last pass wait on disk until the update: no second collection
                    curv[p.key] = (
                        built[p.key].store(Path(spill) / f"{i}-{len(curv)}.pt")
                        if i < passes - 1
                        else built[p.key]
                    )
                del built
            except Exception as e:  # noqa: BLE001 - raised on every rank by agree()
                error = e
                for _ in grads:  # finish this pass's exchanges, which the peers are in
                    pass
            distributed.agree(error, "prune")
            clock = problem.timed("scores", clock)
        distinct = distributed.allreduce_sum(float(seen.get("distinct", counts[rank])))
        problem.data.distinct_batches = int(distinct)
        counts_by_piece = _allocate_sharded(targets, plan, scored, sparsity, parts)
        est, values, flags, error = 0.0, {}, {}, None
        try:
            for p in mine:
                order, cost = scored[p.key]
                new, pruned, e = stages.update(
                    p,
                    weights[p.key],
                    curv.pop(p.key),
                    parts.solver,
                    order,
                    cost,
                    counts_by_piece[p.key],
                    structure,
                )
                est += e
                values[p.key] = new.flatten()[: p.numel]
                flags[p.key] = pruned.flatten()[: p.numel]
        except Exception as e:  # noqa: BLE001 - raised on every rank by agree()
            error = e
        distributed.agree(error, "prune")
    est = distributed.allreduce_sum(est)
    gathered = distributed.gather_pieces(plan, values, flags)
    with torch.no_grad():
        for t in targets:
            w, m = gathered[t.name]
            t.param.copy_(w.view_as(t.param).to(t.param.dtype))
            masks.update(t.name, m.view_as(t.param))
    masks.apply(problem.model)
    problem.timed("allocation and update", clock)
    return est, passes


class _KeyedPiece(distributed.Piece):
    """A piece presented to ``Curvature.build`` under its unique key (one rank may hold several
    pieces of a parameter, told apart by their block ranges), counted with the padding of its
    last block: a piece made of a parameter's partial last block alone keeps the block size (the
    curvature pads it with zeros, as it pads a whole parameter's last block on one process)."""

    def __init__(self, p):
        super().__init__(p.key, p.param, p.block, first=p.first, stop=p.stop)

    @property
    def numel(self) -> int:
        return self.num_blocks * self.block


def _padded(grads, pieces):
    """Gradient batches with each piece's columns zero-padded to whole blocks."""
    for batch in grads:
        out = {}
        for p in pieces:
            g = batch[p.key]
            pad = p.num_blocks * p.block - p.numel
            out[p.key] = torch.nn.functional.pad(g, (0, pad)) if pad else g
        yield out


def _weights_and_fixed(targets, masks):
    """``{key: [n, B] float64 weights}`` and ``{key: pruned-earlier flags}`` of targets or pieces."""
    pairs = {t.key: t.weights_and_fixed(masks) for t in targets}
    return {k: w for k, (w, _) in pairs.items()}, {k: f for k, (_, f) in pairs.items()}


def _allocate_sharded(targets, plan, scored, sparsity, parts):
    """Stage 4 across ranks: the same counts as :func:`_allocate` on one process."""
    rank = distributed.world()[0]
    mine = plan[rank]
    if parts.structure.nm:
        return {p.key: (scored[p.key][0] >= 0).sum(1) for p in mine}
    g = parts.structure.group
    costs = {p.key: scored[p.key][1] for p in mine}
    from curvature.pruning.allocation import _monotone

    if isinstance(parts.allocation, GlobalThreshold):
        pools = [[_monotone(costs[p.key]) for p in mine]]
        ks = [round(sparsity * sum(t.numel for t in targets) / g)]
        out = distributed.take_cheapest(pools, ks)[0]
        return {p.key: c for p, c in zip(mine, out)}
    per = getattr(parts.allocation, "sparsities", {})
    names = [t.name for t in targets]
    pools = [[_monotone(costs[p.key]) for p in mine if p.name == n] for n in names]
    ks = [round(per.get(t.name, sparsity) * t.numel / g) for t in targets]
    out = distributed.take_cheapest(pools, ks)
    result = {}
    for n, pool_counts in zip(names, out):
        for p, c in zip([p for p in mine if p.name == n], pool_counts):
            result[p.key] = c
    return result


def _allocate(targets, scored, sparsity, parts):
    """Stage 4: groups to prune per block (N:M: fixed by the structure)."""
    if parts.structure.nm:
        return {t.name: (scored[t.name][0] >= 0).sum(1) for t in targets}
    costs = {t.name: scored[t.name][1] for t in targets}
    return parts.allocation.counts(targets, costs, sparsity, parts.structure.group)
