r"""Pruning across ``torch.distributed`` processes: the same answer as one process, split up.

Under an initialised process group with more than one process, the engine's gradient methods
(``obs``, ``obs-independent``, ``mfac``) run one pruning step like this:

1. **Gradients split by rank.** Rank ``r`` computes ``gradients // W`` gradients (one more on the
   first ``gradients % W`` ranks) from the batches it was given (its shard, as a
   ``DistributedSampler`` yields them); ``gradients`` counts every rank's gradients together.
2. **Fisher blocks sharded.** The blocks of every selected parameter, in the engine's listing
   order, are cut into ``W`` contiguous ranges of nearly equal block counts (:func:`shard`); rank
   ``r`` keeps the Fisher inverses of its range only. After each batch of gradients an
   ``all_to_all`` sends every rank only the columns of its own blocks (no rank gathers every
   gradient; gloo wants equal chunks, so each is padded to the largest), and each rank streams
   all ``gradients`` gradients into its blocks. Memory for the Fisher is about ``1/W`` of one
   process's; a share over the budget is cut into memory groups (:func:`split_to_fit`), one
   gradient pass each, in lockstep across ranks.
3. **Scores and selection locally**, on the owned blocks (the greedy or independent solver).
4. **The threshold agreed exactly** (:func:`take_cheapest`): the ``k``-th smallest cost over all
   ranks is found by bisection on the costs' order-preserving 64-bit keys, one small
   ``all_reduce`` of counts per step (at most 64), never by gathering the scores; ties at the
   threshold are taken in the listing order, as one process takes them.
5. **Updates locally, weights gathered**: every rank corrects its own blocks' weights, then one
   ``all_gather`` of the new values and masks gives every replica the same model.

With the same gradients in the same order (each rank given a contiguous part of the batches,
and at most one exchange round, 16 gradients, per rank) the masks and weights equal one
process's; otherwise the same gradients arrive in another order and the Fisher differs by
float64 round-off. Every phase ends with an agreement on errors (:func:`agree`): a rank that
raises makes every rank raise ``RuntimeError("prune: rank r failed: ...")`` instead of hanging.
The plan is made from the smallest memory budget of any rank, and gradients travel in the
widest dtype of the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from curvature.core.parallel import world
from curvature.pruning.allocation import take_at_threshold
from curvature.pruning.targets import Target


def active() -> bool:
    return world()[1] > 1


def _comm() -> torch.device:
    """Where small control tensors live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_count(total: int, rank: int, size: int) -> int:
    """This rank's share of ``total`` gradients (the first ``total % size`` ranks take one more)."""
    return total // size + (1 if rank < total % size else 0)


@dataclass
class Piece(Target):
    """Blocks ``[first, stop)`` of a parameter: a :class:`Target` over that range only."""

    first: int = 0
    stop: int = 0

    @property
    def key(self) -> str:
        return f"{self.name}[{self.first}:{self.stop}]"

    @property
    def start(self) -> int:  # first weight, in the parameter's flat order
        return self.first * self.block

    @property
    def end(self) -> int:
        return min(self.stop * self.block, self.param.numel())

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def num_blocks(self) -> int:
        return self.stop - self.first

    def flat(self, flat_param: torch.Tensor) -> torch.Tensor:
        return flat_param[self.start : self.end]

    def valid(self) -> torch.Tensor:
        v = torch.ones(self.num_blocks * self.block, dtype=torch.bool, device=self.param.device)
        v[self.numel :] = False
        return v.view(self.num_blocks, self.block)


def shard(targets: list[Target], size: int) -> list[list[Piece]]:
    """The pieces each of ``size`` ranks owns: contiguous, nearly equal counts of blocks (weighted
    by block area, so parameters with smaller blocks count for what they hold)."""
    weights = [t.block * t.block for t in targets]
    total = sum(t.num_blocks * w for t, w in zip(targets, weights))
    bounds = [round(total * r / size) for r in range(size + 1)]
    out: list[list[Piece]] = [[] for _ in range(size)]
    offset = 0  # weighted position of the current target's first block
    for t, w in zip(targets, weights):
        for r in range(size):
            lo = max(0, -(-(bounds[r] - offset) // w))  # first block at or past the bound
            hi = min(t.num_blocks, -(-(bounds[r + 1] - offset) // w))
            if hi > lo:
                out[r].append(Piece(t.name, t.param, t.block, first=lo, stop=hi))
        offset += t.num_blocks * w
    return out


def split_to_fit(pieces: list[Piece], need, budget: int) -> list[Piece]:
    """``pieces`` cut into block ranges whose ``need(piece)`` bytes fit ``budget`` (in order)."""
    out = []
    for p in pieces:
        parts = 1
        while parts < p.num_blocks and need(_cut(p, 0, -(-p.num_blocks // parts))) > budget:
            parts *= 2
        step = -(-p.num_blocks // parts)
        out.extend(_cut(p, a, min(p.num_blocks, a + step)) for a in range(0, p.num_blocks, step))
    return out


def _cut(p: Piece, a: int, b: int) -> Piece:
    return Piece(p.name, p.param, p.block, first=p.first + a, stop=p.first + b)


def agree(error: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank failed (a rank never waits forever for a dead peer)."""
    rank, size = world()
    msgs: list = [None] * size
    dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        r, m = failed[0]
        if error is not None and r == rank:
            raise error
        raise RuntimeError(f"{what}: rank {r} failed: {m}")


def exchange_gradients(local, plan: list[list[Piece]], counts: list[int], batch: int, dtype):
    """Yield ``{piece key: [k, piece numel]}`` for this rank's pieces, from every rank's gradients.

    ``local`` yields this rank's ``{name: [k_r, numel]}`` batches of at most ``batch`` gradients
    (exactly ``batch`` but for the last); ``counts`` is every rank's gradient count. Rounds run in
    lockstep: in round ``i`` rank ``p`` contributes ``min(batch, counts[p] - i*batch)`` gradients.
    """
    rank, size = world()
    mine = plan[rank]
    widths = [sum(p.numel for p in pieces) for pieces in plan]
    rounds = max(-(-c // batch) for c in counts) if counts else 0
    it = iter(local)
    for i in range(rounds):
        ks = [max(0, min(batch, c - i * batch)) for c in counts]
        got, error = None, None
        try:
            if ks[rank]:
                got = next(it)
        except Exception as e:  # noqa: BLE001 - reported to every rank by agree()
            error = e
        agree(error, "prune")
        dev = _device(plan)
        # gloo's all_to_all wants chunks of one size: every chunk padded to the largest
        chunk = max(k * w for k in ks for w in widths)
        send = []
        for q in range(size):
            buf = torch.zeros(chunk, dtype=dtype, device=dev)
            if ks[rank] and plan[q]:
                cols = [got[p.name][:, p.start : p.end] for p in plan[q]]  # [k_r, piece width]
                flat = torch.cat(cols, dim=1).to(dtype).flatten()
                buf[: flat.numel()] = flat
            send.append(buf)
        recv = [torch.empty(chunk, dtype=dtype, device=dev) for _ in range(size)]
        dist.all_to_all(recv, send)
        recv = [r[: ks[p] * widths[rank]] for p, r in enumerate(recv)]
        if not mine or not sum(ks):
            continue
        full = torch.cat([r.view(ks[p], widths[rank]) for p, r in enumerate(recv) if ks[p]])
        out, col = {}, 0
        for p in mine:
            out[p.key] = full[:, col : col + p.numel]
            col += p.numel
        yield out
    for _ in it:  # a rank never holds more batches than its count; drain the generator
        pass


def _device(plan) -> torch.device:
    for pieces in plan:
        for p in pieces:
            return p.param.device
    return torch.device("cpu")


def _keys(costs: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys of float64 values (``-0.0`` counted as ``+0.0``)."""
    bits = (costs.to(torch.float64) + 0.0).view(torch.int64)
    return torch.where(bits < 0, -(bits ^ torch.iinfo(torch.int64).min) - 1, bits)


def take_cheapest(pools: list[list[torch.Tensor]], ks: list[int]) -> list[list[torch.Tensor]]:
    """Counts per block: in every pool, the ``ks[i]`` cheapest steps over all ranks.

    ``pools[i]`` lists this rank's monotone cost tensors ``[n, steps]`` of pool ``i`` (one pool for
    a global threshold, one per parameter for a target per layer), in listing order; ranks hold
    consecutive parts of that order. Equals the one-process selection
    (:func:`curvature.pruning.allocation.take_cheapest` over the concatenation).
    """
    rank, size = world()
    keys = [torch.cat([_keys(c).flatten() for c in pool]) if pool else None for pool in pools]
    big = torch.iinfo(torch.int64).max
    lo_hi = torch.tensor(
        [
            [-(k.min().item()) if k is not None and k.numel() else -big for k in keys],
            [k.max().item() if k is not None and k.numel() else -big for k in keys],
        ],
        dtype=torch.int64,
        device=_comm(),
    )
    dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX)
    lo = [-int(v) for v in lo_hi[0]]
    hi = [int(v) for v in lo_hi[1]]
    total = _allsum([k.numel() if k is not None else 0 for k in keys])
    want = [max(0, min(int(k), int(n))) for k, n in zip(ks, total)]
    # bisection: the smallest key T with count(key <= T) >= want, every pool at once
    while any(a < b for a, b, w in zip(lo, hi, want) if w):
        mids = [a + (b - a) // 2 for a, b in zip(lo, hi)]
        cnt = _allsum(
            [int((k <= m).sum()) if k is not None and w else 0 for k, m, w in zip(keys, mids, want)]
        )
        for i, (m, c, w) in enumerate(zip(mids, cnt, want)):
            if not w or lo[i] >= hi[i]:
                continue
            if c >= w:
                hi[i] = m
            else:
                lo[i] = m + 1
    below = _allsum(
        [int((k < t).sum()) if k is not None and w else 0 for k, t, w in zip(keys, lo, want)]
    )
    ties_local = [
        int((k == t).sum()) if k is not None and w else 0 for k, t, w in zip(keys, lo, want)
    ]
    ties = torch.tensor(ties_local, dtype=torch.int64, device=_comm())
    all_ties = [torch.zeros_like(ties) for _ in range(size)]
    dist.all_gather(all_ties, ties)
    out = []
    for i, pool in enumerate(pools):
        if not want[i]:
            out.append([torch.zeros(c.shape[0], dtype=torch.long, device=c.device) for c in pool])
            continue
        need = max(0, want[i] - int(below[i]) - sum(int(all_ties[p][i]) for p in range(rank)))
        counts = take_at_threshold([_keys(c) for c in pool], lo[i], need)
        out.append([n.to(c.device) for n, c in zip(counts, pool)])
    return out


def _allsum(values: list[int]) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64, device=_comm())
    dist.all_reduce(t)
    return [int(v) for v in t]


def gather_pieces(plan: list[list[Piece]], values: dict, masks: dict):
    """Every rank's new weights and masks of its pieces, on every rank.

    ``values[key]``/``masks[key]``: this rank's flat new weights (float64) and pruned flags of each
    of its pieces. Returns ``{parameter name: (flat weights, flat mask)}`` for the parameters of
    all pieces, assembled from every rank.
    """
    rank, size = world()
    lengths = [sum(p.numel for p in pieces) for pieces in plan]
    width = max(lengths) if lengths else 0
    dev = _device(plan)
    mine = plan[rank]
    vals = torch.zeros(width, dtype=torch.float64, device=dev)
    flags = torch.zeros(width, dtype=torch.uint8, device=dev)
    col = 0
    for p in mine:
        vals[col : col + p.numel] = values[p.key]
        flags[col : col + p.numel] = masks[p.key].to(torch.uint8)
        col += p.numel
    all_vals = [torch.empty_like(vals) for _ in range(size)]
    all_flags = [torch.empty_like(flags) for _ in range(size)]
    dist.all_gather(all_vals, vals)
    dist.all_gather(all_flags, flags)
    out: dict = {}
    for r, pieces in enumerate(plan):
        col = 0
        for p in pieces:
            if p.name not in out:
                n = p.param.numel()
                out[p.name] = (
                    torch.zeros(n, dtype=torch.float64, device=dev),
                    torch.zeros(n, dtype=torch.bool, device=dev),
                )
            w, m = out[p.name]
            w[p.start : p.end] = all_vals[r][col : col + p.numel]
            m[p.start : p.end] = all_flags[r][col : col + p.numel].bool()
            col += p.numel
    return out


def allreduce_min(value: int) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def allreduce_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_comm())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def allreduce_sum(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_comm())
    dist.all_reduce(t)
    return float(t.item())


def allreduce_stats(total: torch.Tensor | None, rows: int, name: str, dst: int | None = None):
    """Sum a layer's input statistics over ranks (each calibrated on its own shard): on every
    rank, or only on rank ``dst`` (the others get ``(None, rows)``)."""
    error = None if total is not None else ValueError(f"{name}: no calibration input on a rank")
    agree(error, "prune")
    total = total.clone()
    if dst is None:
        dist.all_reduce(total)
    else:
        dist.reduce(total, dst=dst)
        total = total if dist.get_rank() == dst else None
    return total, int(_allsum([rows])[0])


def broadcast_layer(solved, like: torch.Tensor, src: int):
    """A layer's ``(new weights, mask, estimate)`` from rank ``src``, which solved it."""
    rank = dist.get_rank()
    new = (
        solved[0].to(torch.float64).contiguous()
        if rank == src  # a fresh contiguous buffer: the layer's matrix may be a transposed view
        else torch.empty(like.shape, dtype=torch.float64, device=like.device)
    )
    mask = (
        solved[1].to(torch.uint8).contiguous()
        if rank == src
        else torch.empty(like.shape, dtype=torch.uint8, device=like.device)
    )
    est = torch.tensor(
        [float(solved[2]) if rank == src else 0.0], dtype=torch.float64, device=_comm()
    )
    dist.broadcast(new, src=src)
    dist.broadcast(mask, src=src)
    dist.broadcast(est, src=src)
    return new, mask.bool(), float(est.item())


def broadcast_float(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_comm())
    dist.broadcast(t, src=0)
    return float(t.item())
