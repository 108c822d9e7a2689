"""The gradient driver: prune from per-example gradients and a curvature built from them.

Runs a pipeline whose chooser's ``driver`` is ``"gradient"`` (:class:`~.parts.OBS`,
:class:`~.parts.Magnitude`, or any :class:`~.curvatures.Curvature` and
:class:`~.solvers.Solver`). One pruning step runs the stages of :mod:`curvature.pruning.stages`:

1. choose the parameters (:class:`~curvature.pruning.targets.Target`) and check they fit the mask;
2. plan memory: split the targets into groups whose curvature fits the budget;
3. per group, collect gradients and build the curvature (for OBS: ``gradients`` per-example
   gradients, one per batch of ``data``, streamed into a block-diagonal
   :class:`~curvature.FisherInverse`), then order each block's groups and cost each step (the
   solver);
4. allocate the global (or per-layer) target across blocks by those costs;
5. correct the kept weights (the solver's update) and set the pruned ones exactly to zero.

When the curvature of all targets does not fit the memory budget, the targets are split into
groups. Gradients are then recomputed per group from the same batches (the data's shuffling
generators are replayed, see :class:`~curvature.pruning.stages.ReplayableData`), never from a
partly pruned model: every group's curvature is built and scored before any weight changes, and
the curvature of all groups but the last waits on disk (memory-mapped) for the update stage. The
answer is the same as without a split; the cost is one gradient pass per group.

``recomputations > 1`` splits the step into equal sparsity increments and re-collects the
gradients after each (the Fisher then describes the partly pruned model).

Under an initialised ``torch.distributed`` process group of several processes the gradients are
split across ranks and the Fisher blocks sharded (:mod:`curvature.pruning.distributed`); every
rank ends with the same model, masks and report (its ``memory_plan`` is the rank's own).

A :class:`~.parts.Reconstruct` part runs after the step as one more calibration pass of the
layer-wise driver, the chosen masks kept.
"""

from __future__ import annotations

import functools
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from curvature.core.checks import available_bytes
from curvature.pruning import distributed, layerwise, stages
from curvature.pruning.allocation import Allocation, GlobalThreshold, LayerTargets, monotone
from curvature.pruning.curvatures import Curvature
from curvature.pruning.masks import MaskSet, MaskStructure, check_param_fits
from curvature.pruning.params import select_for, select_params
from curvature.pruning.report import PruneReport
from curvature.pruning.settings import PruneSettings
from curvature.pruning.solvers import KeepMask, Solver
from curvature.pruning.targets import Target


def run(model, data, loss_fn, call: PruneSettings, pipeline, masks: MaskSet) -> PruneReport:
    """Prune ``model`` with the gradient-driver chooser of ``pipeline`` (and reconstruct after,
    when the pipeline has that part)."""
    start = time.perf_counter()
    post = pipeline.reconstruct
    if post is not None:  # the dense weights, whose outputs the reconstruction reproduces
        lin = layerwise.layer_targets(model, select_params(model, call.param_list))
        dense = {t.name: t.matrix().to(t.param.dtype) for t in lin}
    report = _step_all(model, data, loss_fn, call, pipeline.chooser, masks)
    if post is not None:
        layer_pass = layerwise.LayerPass(
            solver=KeepMask(),
            diagonal=False,
            batches=pipeline.batches,
            sequential=post.sequential,
            rel_damp=post.rel_damp,
            label="reconstruct",
            structure=call.structure,
            progress=call.progress,
            objective=pipeline.objective,
            reconstruct=post,
        )
        dense = {n: w.to(torch.float64) for n, w in dense.items()}
        sparsities = {t.name: report.param_sparsity[t.name] for t in lin}
        res = layerwise.run(model, data, loss_fn, lin, sparsities, layer_pass, report.masks, dense)
        report.phases = {
            **report.phases,
            **{f"reconstruct_{k}": v for k, v in res.phases().items()},
        }
        report.reconstruction = res.reconstruction()
    report.seconds = time.perf_counter() - start
    if distributed.active():  # one report on every rank: rank 0's clock
        report.seconds = distributed.broadcast_float(report.seconds)
    return report


def _steps(call, chooser, targets, masks):
    """The target of each recomputation step: a float, or ``{name: sparsity}`` per parameter;
    and the overall target."""
    total = sum(t.numel for t in targets)
    r_ = 1 if call.structure.nm else chooser.recomputations
    if call.per_parameter:
        final = call.targets()
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
        return steps, target
    already = sum(int(masks.get(t.name).sum()) for t in targets if t.name in masks)
    s0 = already / total
    target = call.sparsity
    return [s0 + (max(target, s0) - s0) * (r + 1) / r_ for r in range(r_)], target


def _step_all(model, data, loss_fn, call, chooser, masks) -> PruneReport:
    structure = call.structure
    curvature, solver = chooser.curvature(), chooser.solver()
    allocation = GlobalThreshold() if call.global_sparsity else LayerTargets()
    named, skipped = select_for(model, call)
    for name, p in named:
        check_param_fits(name, p, structure)
    # a parameter smaller than a block is one block of its own size (a multiple of the mask's run)
    targets = [Target(n, p, min(chooser.block_size, p.numel())) for n, p in named]
    total = sum(t.numel for t in targets)
    steps, target = _steps(call, chooser, targets, masks)
    budget = _curvature_budget(model, targets, curvature, call)
    problem = _Problem(model, stages.ReplayableData(data), loss_fn, call)
    est, groups = 0.0, 1
    for s in steps:
        if isinstance(s, dict):  # a target per parameter: the allocation carries them
            parts = _Parts(curvature, solver, LayerTargets(s), structure)
            s = sum(s[t.name] * t.numel for t in targets) / total
        else:
            parts = _Parts(curvature, solver, allocation, structure)
        e, g = _prune_step(problem, targets, masks, s, parts, budget)
        est, groups = est + e, max(groups, g)
    per = {t.name: float(masks.get(t.name).float().mean()) for t in targets}
    uses_curvature = curvature.needs_gradients
    distinct = problem.data.distinct_batches
    if uses_curvature and distinct is not None and distinct < curvature.gradients:
        warnings.warn(
            f"prune: data has {distinct} batches but gradients={curvature.gradients}: it was "
            f"read more than once (the same batches again, or a shuffling loader's new batches "
            f"of the same examples); pass at least that many batches or lower gradients",
            stacklevel=5,
        )
    return PruneReport(
        method=chooser.label,
        mask=structure.name,
        selection=solver.name if uses_curvature else "-",
        target_sparsity=float(target),
        global_sparsity=sum(per[t.name] * t.numel for t in targets) / total,
        param_sparsity=per,
        estimated_loss_increase=est if uses_curvature else None,
        gradients=curvature.gradients if uses_curvature else 0,
        seconds=0.0,  # set by run()
        distinct_batches=distinct if uses_curvature else None,
        skipped=skipped,
        memory_groups=groups,
        memory_plan=max((p.as_dict() for p in problem.plans), key=lambda d: d["total"])
        if problem.plans
        else {"curvature": 0},
        phases=dict(problem.phases),
        masks=masks,
    )


def _curvature_budget(model, targets, curvature, call) -> int:
    """Bytes the curvature may take: ``max_memory`` if given; otherwise 60% of the available
    memory less every other buffer the step holds (the memory plan's other terms)."""
    if call.max_memory is not None:
        return call.max_memory
    available = available_bytes(targets[0].param.device) or 8 << 30
    others = stages.memory_plan(model, targets, [targets], curvature, call.structure)
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
    call: PruneSettings
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


def _prune_step(problem, targets, masks, sparsity, parts, budget) -> tuple[float, int]:
    """One pruning step to ``sparsity``: the stages of :mod:`curvature.pruning.stages`."""
    if distributed.active() and parts.curvature.needs_gradients:
        return _prune_step_sharded(problem, targets, masks, sparsity, parts, budget)
    structure = parts.structure
    groups = stages.plan_groups(targets, parts.curvature, budget)
    problem.plans.append(
        stages.memory_plan(problem.model, targets, groups, parts.curvature, structure)
    )
    problem.data.new_step()  # recomputations draw fresh batches; groups of one step replay them
    weights, fixed = _weights_and_fixed(targets, masks)

    with tempfile.TemporaryDirectory(prefix="curvature-prune-") as spill:
        built, scored = [], {}
        clock = time.perf_counter()
        for gi, group in enumerate(groups):
            curv = stages.build_curvature(problem, group, parts.curvature, problem.call)
            clock = problem.timed("gradients and curvature", clock)
            scored.update(
                stages.score(
                    group, weights, fixed, curv, parts.solver, structure, problem.call.progress
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


def _prune_step_sharded(problem, targets, masks, sparsity, parts, budget):
    """:func:`_prune_step` across the ranks of the process group.

    Every rank owns a contiguous share of the blocks; when its share's curvature does not fit
    ``budget`` it is split into memory groups as on one process (pieces cut by block ranges),
    and every rank runs as many gradient passes as the rank with the most groups (lockstep:
    every pass is one exchange), keeping the curvature of all groups but the last on disk.
    """
    rank, size = distributed.world()
    structure = parts.structure
    budget = distributed.allreduce_min(budget)  # one plan on every rank: the smallest budget
    need = parts.curvature.estimate_bytes
    plan = [
        distributed.split_to_fit(pieces, need, budget)
        for pieces in distributed.shard(targets, size)
    ]
    groups = [
        stages.plan_groups(pieces, parts.curvature, budget) if pieces else [] for pieces in plan
    ]
    passes = max(len(g) for g in groups)
    mine = plan[rank]
    if mine:
        problem.plans.append(
            stages.memory_plan(problem.model, mine, groups[rank], parts.curvature, structure)
        )
    problem.data.new_step()
    counts = [distributed.local_count(parts.curvature.gradients, r, size) for r in range(size)]
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
                    gradients=counts[rank],
                    progress=problem.call.progress and rank == 0,
                    counts=seen,
                )
            grads = distributed.exchange_gradients(
                local or iter(()), active, counts, stages.GRADIENT_BATCH, dtype
            )
            error = None
            try:
                built = parts.curvature.build(
                    [_KeyedPiece(p) for p in active[rank]],
                    _padded(grads, active[rank]),
                    problem.call,
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
        est, values, flags, error = _update_pieces(
            mine, (weights, curv, scored), counts_by_piece, parts
        )
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


def _update_pieces(mine, state, counts, parts):
    """Stage 5 on this rank's pieces: ``(summed cost, {key: weights}, {key: flags}, error)``;
    an error is returned, for every rank to raise it together."""
    weights, curv, scored = state
    est, values, flags = 0.0, {}, {}
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
                counts[p.key],
                parts.structure,
            )
            est += e
            values[p.key] = new.flatten()[: p.numel]
            flags[p.key] = pruned.flatten()[: p.numel]
    except Exception as e:  # noqa: BLE001 - raised on every rank by agree()
        return est, values, flags, e
    return est, values, flags, None


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
    mine = plan[distributed.world()[0]]
    if parts.structure.nm:
        return {p.key: (scored[p.key][0] >= 0).sum(1) for p in mine}
    pools, ks = parts.allocation.pools(targets, mine, sparsity, parts.structure.group)
    costs = [[monotone(scored[p.key][1]) for p in pool] for pool in pools]
    out = distributed.take_cheapest(costs, ks)
    return {p.key: c for pool, counts in zip(pools, out) for p, c in zip(pool, counts)}


def _allocate(targets, scored, sparsity, parts):
    """Stage 4: groups to prune per block (N:M: fixed by the structure)."""
    if parts.structure.nm:
        return {t.name: (scored[t.name][0] >= 0).sum(1) for t in targets}
    costs = {t.name: scored[t.name][1] for t in targets}
    return parts.allocation.counts(targets, costs, sparsity, parts.structure.group)
