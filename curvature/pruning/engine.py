"""One-shot pruning of any ``torch.nn.Module``: OBS (greedy or independent) and magnitude.

The flow of one pruning step:

1. choose the parameters and check they fit the mask structure;
2. for OBS, stream ``num_grads`` gradients (one per batch of ``data``) into a block-diagonal
   :class:`~curvature.FisherInverse` per parameter, in memory-sized groups of parameters;
3. per Fisher block, order the groups to prune and the loss increase of each (greedy: exact
   one-at-a-time OBS; independent: the oBERT scores once), and allocate the global (or per-layer)
   target across blocks by those costs;
4. apply the OBS correction to the kept weights and set the pruned ones exactly to zero.

``num_recomputations > 1`` splits the step into equal sparsity increments and re-collects the
gradients after each (the Fisher then describes the partly pruned model).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from curvature import FisherInverse
from curvature.pruning import obs
from curvature.pruning.masks import MaskSet, check_param_fits, parse_mask
from curvature.pruning.params import select_params

METHODS = ("obs", "magnitude")
SELECTIONS = ("greedy", "independent")
# Blocks handled per chunk in the block loops: bounds the float64 temporaries (~64 MB).
_CHUNK_BYTES = 64 << 20


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
    num_grads: int
    seconds: float
    masks: MaskSet = field(repr=False, default_factory=MaskSet)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "masks"}
        return d


@dataclass
class _Target:
    name: str
    param: torch.nn.Parameter
    block: int

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.numel / self.block)

    def blocks_of(self, flat: torch.Tensor, fill=0) -> torch.Tensor:
        pad = self.num_blocks * self.block - self.numel
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad), value=fill)
        return flat.view(self.num_blocks, self.block)

    def valid(self) -> torch.Tensor:
        v = torch.ones(self.num_blocks * self.block, dtype=torch.bool, device=self.param.device)
        v[self.numel :] = False
        return v.view(self.num_blocks, self.block)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def plan_groups(targets, *, num_grads, dtype, budget) -> list[list[_Target]]:
    """Split the targets into groups whose Fisher blocks fit in ``budget`` bytes together."""
    groups, current, used = [], [], 0
    for t in targets:
        need = FisherInverse.estimate_bytes(
            t.numel, num_grads=num_grads, block_size=t.block, dtype=dtype
        )
        if need > budget:
            raise MemoryError(
                f"the Fisher blocks of {t.name} ({t.numel:,} weights, block_size {t.block}) need "
                f"{need / 2**30:.1f} GiB, more than the {budget / 2**30:.1f} GiB budget: lower "
                "block_size (fisher_block_size), use fisher_dtype=torch.float32, or raise max_memory"
            )
        if current and used + need > budget:
            groups.append(current)
            current, used = [], 0
        current.append(t)
        used += need
    if current:
        groups.append(current)
    return groups


def collect_fisher(
    model, data, loss_fn, targets, *, num_grads, damp, dtype, progress=True, batch=16
) -> dict[str, FisherInverse]:
    """Stream ``num_grads`` gradients (one per batch, cycling over ``data``) into Fisher inverses."""
    fishers = {
        t.name: FisherInverse(
            t.numel,
            num_grads=num_grads,
            damp=damp,
            block_size=t.block,
            dtype=dtype,
            device=t.param.device,
        )
        for t in targets
    }
    pending: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}

    def flush():
        for t in targets:
            if pending[t.name]:
                fishers[t.name].add_grad(torch.stack(pending[t.name]))
                pending[t.name] = []

    was_training = model.training
    model.eval()  # deterministic gradients: no dropout
    seen = 0
    bar = tqdm(total=num_grads, desc="Fisher gradients", disable=not progress, leave=False)
    try:
        while seen < num_grads:
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
                    flush()
                if seen >= num_grads:
                    break
            if seen == before:
                raise ValueError("data yielded no batches: pass a re-iterable of batches")
        flush()
    finally:
        bar.close()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return fishers


def _chunks(n: int, block: int):
    step = max(1, _CHUNK_BYTES // (block * block * 8))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def _order_and_cost(t, w, hinv_of, structure, selection, fixed):
    """Per block: the order in which to prune groups and the cost of each step."""
    valid = t.valid()
    g = structure.group
    orders, costs = [], []
    for sl in _chunks(t.num_blocks, t.block):
        wb, vb, fb = w[sl], valid[sl], fixed[sl]
        if hinv_of is None:  # magnitude: group sums of squares, no curvature
            ng = t.block // g
            scores = (wb * wb).view(-1, ng, g).sum(-1)
        elif selection == "greedy":
            o, c = obs.greedy_order(wb, hinv_of(sl), vb, g, fixed=fb, nm=structure.nm)
            orders.append(o)
            costs.append(c)
            continue
        else:
            scores = obs.independent_scores(wb, hinv_of(sl), g)
        scores = _mark(scores, vb, fb, g)
        if structure.nm:
            o, c = _nm_order(scores, structure.nm)
        else:
            c, o = torch.sort(scores, dim=1, stable=True)
            o = torch.where(torch.isfinite(c), o, torch.full_like(o, -1))
        orders.append(o)
        costs.append(c)
    return torch.cat(orders), torch.cat(costs)


def _mark(scores, valid, fixed, g):
    n = scores.shape[0]
    vg = valid.view(n, -1, g).all(-1)
    fg = fixed.view(n, -1, g).all(-1)
    scores = torch.where(fg, torch.full_like(scores, obs.FIXED_SCORE), scores)
    return scores.masked_fill(~vg, float("inf"))


def _nm_order(scores, nm):
    """Independent N:M: in every run of M, the M - N lowest scores, in ascending order."""
    n_, m_ = nm
    n, b = scores.shape
    runs = scores.view(n, b // m_, m_)
    c, o = torch.topk(runs, m_ - n_, dim=-1, largest=False, sorted=True)
    o = o + torch.arange(0, b, m_, device=scores.device)[None, :, None]
    return o.reshape(n, -1), c.reshape(n, -1)


def _allocate(costs: list[torch.Tensor], budgets: list[int]) -> list[torch.Tensor]:
    """Counts per block: the ``budget`` cheapest steps across blocks, as prefixes of each block.

    Costs are made non-decreasing along each block (running max) so that taking the cheapest
    steps across all blocks always takes a prefix of every block's order.
    """
    flat = [torch.cummax(c.clamp_min(obs.FIXED_SCORE), dim=1).values for c in costs]
    allv = torch.cat([f.flatten() for f in flat])
    owner = torch.cat([torch.full((f.numel(),), i, dtype=torch.long) for i, f in enumerate(flat)])
    k = budgets[0]
    order = torch.argsort(allv.cpu(), stable=True)[:k]
    counts = []
    for i, f in enumerate(flat):
        picked = order[owner[order] == i]
        offset = sum(x.numel() for x in flat[:i])
        block_ids = (picked - offset) // f.shape[1]
        counts.append(torch.bincount(block_ids, minlength=f.shape[0]).to(f.device))
    return counts


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
    global_sparsity: bool = True,
    masks: MaskSet | None = None,
    fisher_dtype: torch.dtype = torch.float64,
    max_memory: int | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` and return a :class:`PruneReport`.

    Args:
        model: any module; its selected weights are overwritten.
        data: a re-iterable of batches (a list or a ``DataLoader``); one gradient per batch.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        sparsity: target fraction of zeros over the selected parameters, in ``[0, 1)``
            (for ``N:M`` masks it must be ``1 - N/M``).
        method: ``"obs"`` (curvature) or ``"magnitude"``.
        mask: ``"unstructured"``, ``"block4"`` or ``"N:M"`` such as ``"2:4"``.
        params: names, ``re:`` patterns or ``__ALL_PRUNABLE__``.
        num_grads, block_size, damp: the empirical Fisher (``block_size`` must be a multiple of
            the mask's group).
        num_recomputations: split the step and re-collect gradients in between.
        selection: ``"greedy"`` (exact one-at-a-time OBS inside each block) or ``"independent"``
            (oBERT: score once, prune together, sum the corrections).
        global_sparsity: one threshold across all parameters (``True``) or the target per layer.
        masks: weights pruned earlier (kept pruned; counted toward the target).
        fisher_dtype: storage dtype of the Fisher blocks (float64; float32 halves the memory).
        max_memory: bytes the Fisher blocks may take (default: 60% of the free memory).
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    structure = parse_mask(mask)
    if structure.fixed_sparsity is not None and abs(sparsity - structure.fixed_sparsity) > 1e-9:
        raise ValueError(
            f"mask {structure.name} prunes exactly {structure.fixed_sparsity:g}; got sparsity {sparsity}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if block_size % structure.run:
        raise ValueError(
            f"block_size {block_size} is not a multiple of the {structure.name} group of {structure.run}"
        )
    if (
        isinstance(num_recomputations, bool)
        or not isinstance(num_recomputations, int)
        or num_recomputations < 1
    ):
        raise ValueError(f"num_recomputations must be an integer >= 1, got {num_recomputations!r}")
    if method == "obs":
        if isinstance(num_grads, bool) or not isinstance(num_grads, int) or num_grads <= 0:
            raise ValueError(f"num_grads must be a positive integer, got {num_grads!r}")
        if not isinstance(damp, (int, float)) or not damp > 0:
            raise ValueError(f"damp must be > 0, got {damp!r}")

    named = select_params(model, params)
    for name, p in named:
        check_param_fits(name, p, structure)
    targets = [_Target(n, p, block_size) for n, p in named]
    masks = masks if masks is not None else MaskSet()
    total = sum(t.numel for t in targets)
    already = sum(int(masks.get(t.name).sum()) for t in targets if t.name in masks)
    s0 = already / total
    if structure.nm:
        steps = [sparsity]
    else:
        steps = [
            s0 + (max(sparsity, s0) - s0) * (r + 1) / num_recomputations
            for r in range(num_recomputations)
        ]
    est = 0.0
    device = targets[0].param.device
    budget = max_memory or int(0.6 * available_memory_bytes(device))
    for step_sparsity in steps:
        est += _prune_step(
            model,
            data,
            loss_fn,
            targets,
            structure,
            step_sparsity,
            method,
            selection,
            global_sparsity,
            masks,
            num_grads,
            damp,
            fisher_dtype,
            budget,
            progress,
        )
    per = {t.name: float(masks.get(t.name).float().mean()) for t in targets}
    reached = sum(per[t.name] * t.numel for t in targets) / total
    return PruneReport(
        method=method,
        mask=structure.name,
        selection=selection if method == "obs" else "-",
        target_sparsity=float(sparsity),
        global_sparsity=reached,
        param_sparsity=per,
        estimated_loss_increase=est if method == "obs" else None,
        num_grads=num_grads if method == "obs" else 0,
        seconds=time.perf_counter() - start,
        masks=masks,
    )


def _prune_step(
    model,
    data,
    loss_fn,
    targets,
    structure,
    sparsity,
    method,
    selection,
    global_sparsity,
    masks,
    num_grads,
    damp,
    dtype,
    budget,
    progress,
) -> float:
    g = structure.group
    groups = (
        plan_groups(targets, num_grads=num_grads, dtype=dtype, budget=budget)
        if method == "obs"
        else [targets]
    )
    weights = {t.name: t.blocks_of(t.param.detach().flatten().to(obs.F64)) for t in targets}
    fixed = {
        t.name: t.blocks_of(masks.get(t.name).flatten(), fill=False)
        if t.name in masks
        else torch.zeros(t.num_blocks, t.block, dtype=torch.bool, device=t.param.device)
        for t in targets
    }
    orders, costs, kept = {}, {}, {}

    def fishers_of(group):
        if method != "obs":
            return None
        return collect_fisher(
            model,
            data,
            loss_fn,
            group,
            num_grads=num_grads,
            damp=damp,
            dtype=dtype,
            progress=progress,
        )

    for group in groups:
        fishers = fishers_of(group)
        for t in tqdm(
            group,
            desc="OBS blocks" if method == "obs" else "scores",
            disable=not progress,
            leave=False,
        ):
            hinv_of = None
            if fishers is not None:
                blocks = fishers[t.name].blocks()
                hinv_of = lambda sl, b=blocks: b[sl].to(obs.F64)  # noqa: E731
            orders[t.name], costs[t.name] = _order_and_cost(
                t, weights[t.name], hinv_of, structure, selection, fixed[t.name]
            )
        if len(groups) == 1 and fishers is not None:
            kept = fishers  # the only group: no need to collect again for the update
    # allocation
    if structure.nm:
        counts = {t.name: (orders[t.name] >= 0).sum(1) for t in targets}
    elif global_sparsity:
        k = round(sparsity * sum(t.numel for t in targets) / g)
        alloc = _allocate([costs[t.name] for t in targets], [k])
        counts = {t.name: c for t, c in zip(targets, alloc)}
    else:
        counts = {
            t.name: _allocate([costs[t.name]], [round(sparsity * t.numel / g)])[0] for t in targets
        }
    est = 0.0
    for group in groups:
        fishers = kept or fishers_of(group)
        for t in group:
            o, c = orders[t.name], costs[t.name]
            pruned = obs.order_to_mask(o, counts[t.name], t.block, g) & t.valid()
            take = torch.arange(o.shape[1], device=o.device)[None, :] < counts[t.name][:, None]
            est += float(
                torch.where(take & torch.isfinite(c), c.clamp_min(0), torch.zeros_like(c)).sum()
            )
            w = weights[t.name]
            if method == "magnitude":
                new = torch.where(pruned, torch.zeros_like(w), w)
            else:
                blocks = fishers[t.name].blocks()
                new = torch.empty_like(w)
                for sl in _chunks(t.num_blocks, t.block):
                    h = blocks[sl].to(obs.F64)
                    if selection == "greedy":
                        new[sl] = obs.masked_update(w[sl], h, pruned[sl])
                    else:
                        new[sl] = obs.independent_update(w[sl], h, pruned[sl], g)
            with torch.no_grad():
                flat = new.flatten()[: t.numel].view_as(t.param)
                t.param.copy_(flat.to(t.param.dtype))
            masks.update(t.name, pruned.flatten()[: t.numel].view_as(t.param))
        del fishers
    masks.apply(model)
    return est
