"""The stages of one pruning step, each with named inputs and outputs.

1. :func:`collect_gradients`: the model, data and loss -> batches of per-sample gradients
   (``{target name: [k, numel]}``), one gradient per data batch;
2. ``Curvature.build`` (:mod:`.curvatures`): gradients -> the curvature of each target;
3. :func:`score`: weights + curvature -> per-block orders and costs (``Solver.order``);
4. ``Allocation.counts`` (:mod:`.allocation`): costs -> how many groups of each block to prune;
5. :func:`update`: weights + curvature + chosen mask -> new weights (``Solver.update``).

:func:`plan_groups` is the memory plan: it splits the targets so that the curvature built at
stage 2 for one group fits the budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from curvature.pruning import obs
from curvature.pruning.targets import CHUNK_BYTES, Target

GRADIENT_BATCH = 16  # gradients stacked per curvature update


class ReplayableData:
    """``data`` whose every pass yields the same batches in the same order.

    A shuffling ``DataLoader`` draws a new order from its generator at each pass (or from torch's
    global generator when it has none). The engine collects gradients once per memory group, and
    every group must see the same gradients: :meth:`replay` restores, before each pass, the
    generator states found at the first pass. After the last pass the states are what one pass
    left them at, as if the data had been read once.
    """

    def __init__(self, data):
        self.data = data
        self._generators = []
        for obj in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
            gen = getattr(obj, "generator", None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in self._generators):
                self._generators.append(gen)
        self._states = None
        # samplers that shuffle by epoch (a DistributedSampler): replayed by resetting the epoch
        self._epoch_samplers = [
            obj
            for obj in (getattr(data, "sampler", None), getattr(data, "batch_sampler", None))
            if hasattr(obj, "set_epoch") and isinstance(getattr(obj, "epoch", None), int)
        ]
        self._epochs: list[int] | None = None
        # distinct batches behind the gradients of a collection (fewer than gradients: cycled)
        self.distinct_batches: int | None = None

    def new_step(self) -> None:
        """Forget the recorded states: the next pass draws fresh batches (a new pruning step);
        an epoch-shuffled sampler moves to its next epoch, as a generator would move on."""
        self._states = None
        if self._epochs is not None:
            for s, e in zip(self._epoch_samplers, self._epochs):
                s.set_epoch(e + 1)
        self._epochs = None

    def replay(self):
        if self._states is None:
            self._states = [g.get_state() for g in self._generators]
            self._global = torch.get_rng_state()
            self._epochs = [s.epoch for s in self._epoch_samplers]
        else:
            for g, s in zip(self._generators, self._states):
                g.set_state(s)
            torch.set_rng_state(self._global)
            for s, e in zip(self._epoch_samplers, self._epochs or []):
                s.set_epoch(e)
        return self.data


class Replayed:
    """``data`` as an iterable whose every pass yields the same batches in the same order (the
    passes of a layer-wise run must line up: the output-Fisher pass, the calibration passes)."""

    def __init__(self, data):
        self.replayable = data.replayable if isinstance(data, Replayed) else ReplayableData(data)

    def __iter__(self):
        return iter(self.replayable.replay())


def collect_gradients(
    model,
    data,
    loss_fn,
    targets: list[Target],
    *,
    gradients: int,
    batch: int = GRADIENT_BATCH,
    progress=True,
    counts: dict | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{target name: [k, numel]}`` gradient batches (``k <= batch``), ``gradients`` in all.

    One gradient per item of ``data`` (a re-iterable, cycled if shorter than ``gradients``), the
    model in eval mode (no dropout: the same batches give the same gradients), its train mode and
    ``.grad`` fields restored at the end (the user's accumulated gradients survive pruning).
    ``counts["distinct"]`` (if given) is set to the number of distinct batches used: ``gradients``,
    or the length of one pass when ``data`` was cycled.
    """
    pending: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}

    def flush():
        out = {t.name: torch.stack(pending[t.name]) for t in targets}
        for t in targets:
            pending[t.name] = []
        return out

    was_training = model.training
    saved_grads = [(p, p.grad) for p in model.parameters()]
    model.eval()
    seen = 0
    bar = tqdm(total=gradients, desc="Fisher gradients", disable=not progress, leave=False)
    try:
        while seen < gradients:
            before = seen
            for item in data:
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, item)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss_fn returned {loss.item()} for a batch: cannot build the Fisher"
                    )
                loss.backward()
                for t in targets:
                    g = t.param.grad
                    pending[t.name].append(
                        torch.zeros(t.numel, device=t.param.device)
                        if g is None
                        else g.detach().flatten().clone()
                    )
                seen += 1
                bar.update(1)
                if len(pending[targets[0].name]) >= batch:
                    yield flush()
                if seen >= gradients:
                    break
            if seen == before:
                raise ValueError("data yielded no batches: pass a re-iterable of batches")
            if counts is not None and "distinct" not in counts:
                counts["distinct"] = seen  # the first pass: every later one repeats it
        if pending[targets[0].name]:
            yield flush()
    finally:
        bar.close()
        for p, g in saved_grads:
            p.grad = g
        model.train(was_training)


@dataclass
class MemoryPlan:
    """Bytes of every large buffer of one pruning step, and the peak they make together.

    Held all step: ``weights``; from scoring to the update: ``scores``; per memory group:
    ``curvature``. Building adds ``gradients``, ``model_grads`` and ``build_work``; scoring and the
    update add ``read_work`` and ``solver_work``. The peak is the larger of the two stages.
    """

    curvature: int  # the largest memory group's curvature (stage 2)
    build_work: int  # temporaries of adding one gradient batch to one target's curvature
    read_work: int  # temporaries of reading one target's curvature (materialised blocks)
    gradients: int  # one batch of per-sample gradients, listed and stacked, for the largest group
    model_grads: int  # the model's own .grad buffers during collection
    weights: int  # float64 weight copies and masks of every target (held all step)
    scores: int  # orders and costs of every target (held from scoring to the update)
    solver_work: int  # solver temporaries on one chunk of blocks, new weights of one target

    @property
    def build_peak(self) -> int:
        return self.curvature + self.build_work + self.gradients + self.model_grads + self.weights

    @property
    def score_peak(self) -> int:
        return self.curvature + self.read_work + self.solver_work + self.weights + self.scores

    @property
    def total(self) -> int:
        return max(self.build_peak, self.score_peak)

    def as_dict(self) -> dict:
        return {
            **self.__dict__,
            "build_peak": self.build_peak,
            "score_peak": self.score_peak,
            "total": self.total,
        }


def memory_plan(model, targets, groups, curvature, structure) -> MemoryPlan:
    """Count every large buffer of a step on ``targets`` split into ``groups`` (``structure``:
    the mask's :class:`~curvature.pruning.masks.MaskStructure`)."""
    # keyed by object: several pieces of one parameter (across ranks) share its name
    per = {id(t): curvature.estimate_bytes(t) for t in targets}
    k = min(GRADIENT_BATCH, curvature.gradients) if curvature.needs_gradients else 0
    item = {id(t): t.param.element_size() for t in targets}
    padded = {id(t): t.num_blocks * t.block for t in targets}
    g = structure.group
    largest = max(groups, key=lambda grp: sum(per[id(t)] for t in grp))
    model_grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    work = [curvature.work_bytes(t, k) for t in targets]  # (build, read) per target
    return MemoryPlan(
        curvature=sum(per[id(t)] for t in largest),
        build_work=max(w[0] for w in work),
        read_work=max(w[1] for w in work),
        gradients=max(sum(2 * k * t.numel * item[id(t)] for t in grp) for grp in groups),
        model_grads=model_grads if curvature.needs_gradients else 0,
        weights=sum(padded[n] * (8 + 1) for n in padded),
        scores=sum(padded[n] // g * 16 for n in padded),
        solver_work=2 * CHUNK_BYTES + max(padded[n] * 9 for n in padded),
    )


def plan_groups(targets: list[Target], curvature, budget: int) -> list[list[Target]]:
    """Split ``targets`` into groups whose built curvature fits in ``budget`` bytes together."""
    groups, current, used = [], [], 0
    for t in targets:
        need = curvature.estimate_bytes(t)
        if need > budget:
            raise MemoryError(
                f"the Fisher blocks of {t.name} ({t.numel:,} weights, block_size {t.block}) need "
                f"{need / 2**30:.1f} GiB, more than the {budget / 2**30:.1f} GiB budget: lower "
                "block_size, use dtype=torch.float32, or raise max_memory"
            )
        if current and used + need > budget:
            groups.append(current)
            current, used = [], 0
        current.append(t)
        used += need
    if current:
        groups.append(current)
    return groups


def build_curvature(problem, group, curvature, call):
    """Stages 1 and 2 for one group of targets (``problem``: model, data and loss_fn).

    ``problem.data`` is a :class:`ReplayableData`: every group sees the same batches.
    """
    grads, counts = None, {}
    if curvature.needs_gradients:
        grads = collect_gradients(
            problem.model,
            problem.data.replay(),
            problem.loss_fn,
            group,
            gradients=curvature.gradients,
            progress=call.progress,
            counts=counts,
        )
    built = curvature.build(group, grads, call)  # consumes every gradient batch
    if "distinct" in counts:  # the fewest distinct batches any collection used
        prev = problem.data.distinct_batches
        problem.data.distinct_batches = min(prev or counts["distinct"], counts["distinct"])
    return built


def score(group, weights, fixed, curvatures, solver, structure, progress=True):
    """Stage 3: ``{name: (orders, costs)}`` for every target of ``group``."""
    out = {}
    desc = "OBS blocks" if solver.needs_inverse else "scores"
    for t in tqdm(group, desc=desc, disable=not progress, leave=False):
        out[t.name] = solver.order(t, weights[t.name], curvatures[t.name], structure, fixed[t.name])
    return out


def update(t, w, curvature, solver, order, cost, count, structure):
    """Stage 5 for one target: ``(new weights [n, B], pruned mask [n, B], summed cost)``."""
    g = structure.group
    pruned = obs.order_to_mask(order, count, t.block, g) & t.valid()
    take = torch.arange(order.shape[1], device=order.device)[None, :] < count[:, None]
    est = float(
        torch.where(take & torch.isfinite(cost), cost.clamp_min(0), torch.zeros_like(cost)).sum()
    )
    return solver.update(t, w, curvature, pruned, structure), pruned, est
