"""The layer-wise runner: calibration forward passes, one layer's input statistics at a time.

Layer-wise methods (:data:`curvature.pruning.registry.LAYERWISE`) prune each selected linear
layer (``nn.Linear``, or GPT-2's ``Conv1D`` whose weight is stored transposed) from the inputs it
sees on the calibration data: ``data`` is read once per pass, and ``loss_fn(model, batch)`` is
called only for its forward pass (no backward, under ``torch.no_grad``), so switching from
gradient-Fisher OBS to a layer-wise method is one word.

Two modes:

- **sequential** (default, as SparseGPT does): the model's repeated blocks (the ``nn.ModuleList``
  holding most of the selected layers: ``model.layers``, ``encoder.layer``, ``h``) are calibrated
  in order. The inputs of the first block are captured once (the positional and keyword
  arguments its forward receives, with caches removed); then for each block its layers' input
  statistics are accumulated by forward hooks while the block runs on those inputs, its layers
  are pruned, and the block runs again to give the next block's inputs, computed by the already
  pruned blocks. One block's statistics are held at a time; the layers of one block are pruned
  from the same inputs. Selected layers outside the blocks (a classifier head) are calibrated
  last with full forward passes of the pruned model.
- **parallel** (``sequential=False``): the statistics of every selected layer are taken from the
  dense model in one pass over the data (all of them held at once), then every layer is pruned.

The statistics are float64 (see :class:`~curvature.pruning.curvatures.LayerHessian`). Layers that
read the same input tensor in one forward pass (q, k and v projections; gate and up) share one
``X^T X`` product.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from curvature.pruning import distributed, stages
from curvature.pruning.params import select_for
from curvature.pruning.report import PruneReport

F64 = torch.float64
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _is_conv1d(module) -> bool:
    # GPT-2's Conv1D: y = x W + b with W stored [in, out]
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass
class LayerTarget:
    """A selected layer: its module and weight, seen as ``[rows = outputs, cols = inputs]``."""

    name: str  # parameter name
    module: torch.nn.Module
    param: torch.nn.Parameter

    @property
    def transposed(self) -> bool:
        return _is_conv1d(self.module)

    def matrix(self) -> torch.Tensor:
        w = self.param.detach()
        return (w.t() if self.transposed else w.reshape(w.shape[0], -1)).to(F64)

    def write(self, new: torch.Tensor) -> None:
        with torch.no_grad():
            new = new.t() if self.transposed else new.view_as(self.param)
            self.param.copy_(new.to(self.param.dtype))

    def as_param_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.t().contiguous() if self.transposed else mask.view_as(self.param)

    def as_matrix_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.t() if self.transposed else mask.reshape(self.param.shape[0], -1)

    @property
    def cols(self) -> int:
        return self.param.shape[0] if self.transposed else self.param[0].numel()


def layer_targets(model, named_params) -> list[LayerTarget]:
    """The modules of the selected weights; one clear error for a weight that is not a linear
    layer's (layer-wise methods need the layer's inputs)."""
    owners = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), (mod_name, mod, p_name))
    out = []
    for name, p in named_params:
        mod_name, mod, p_name = owners[id(p)]
        if p_name != "weight" or not (isinstance(mod, torch.nn.Linear) or _is_conv1d(mod)):
            raise ValueError(
                f"params: {name} is not the weight of a linear layer ({type(mod).__name__}); "
                "layer-wise methods prune nn.Linear and Conv1D weights: exclude it from params"
            )
        out.append(LayerTarget(name, mod, p))
    return out


class _Stats:
    """Forward hooks accumulating ``sum x x^T`` (or ``sum x^2``) of the inputs of some layers.

    ``token_weights`` (``{name: [per-batch [tokens] weights]}``): that layer accumulates
    ``sum s_t x_t x_t^T`` (the Fisher-weighted objective), its own product (not shared)."""

    def __init__(self, targets: list[LayerTarget], diagonal: bool, token_weights=None, dtype=F64):
        self.diagonal = diagonal
        self.dtype = dtype  # of each batch's product; the sums over batches are float64
        self.sums = {t.name: None for t in targets}
        self.rows = dict.fromkeys(self.sums, 0)
        self.token_weights = token_weights or {}
        self.batch = 0
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [
            t.module.register_forward_hook(lambda m, a, o, n=t.name: self._add(n, a[0]))
            for t in targets
        ]

    def _add(self, name, x):
        weights = self.token_weights.get(name)
        if weights is not None:
            x2 = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
            s = weights[self.batch].to(x2.device) if self.batch < len(weights) else None
            if s is None or s.numel() != x2.shape[0]:
                raise ValueError(
                    f"{name}: the calibration batch {self.batch} does not line up with the "
                    "output-Fisher pass (different batches or token counts)"
                )
            xs = x2 * torch.sqrt(s.to(self.dtype))[:, None]
            prod = ((xs * xs).sum(0) if self.diagonal else xs.T @ xs).to(F64)
            self.sums[name] = prod if self.sums[name] is None else self.sums[name] + prod
            self.rows[name] += x2.shape[0]
            return
        key = id(x)
        if key not in self._shared:  # keep x alive so that its id is not reused in this batch
            x2 = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
            prod = ((x2 * x2).sum(0) if self.diagonal else x2.T @ x2).to(F64)
            self._shared[key] = (x, prod, x2.shape[0])
        _, prod, n = self._shared[key]
        self.sums[name] = prod.clone() if self.sums[name] is None else self.sums[name] + prod
        self.rows[name] += n

    def end_batch(self):
        self._shared.clear()
        self.batch += 1

    def result(self, name, owner: int | None = None) -> torch.Tensor | None:
        """``H = 2/N sum x x^T`` (or its diagonal) of layer ``name``; across ranks the sum of every
        rank's statistics, on rank ``owner`` only (``None`` elsewhere) or on all if not given."""
        if self.sums[name] is None and not distributed.active():
            raise ValueError(
                f"{name}: its layer never ran on the calibration data (is it used in the "
                "forward pass that loss_fn makes?)"
            )
        total, rows = self.sums[name], self.rows[name]
        if distributed.active():  # every rank calibrated on its own shard: H from all of them
            total, rows = distributed.allreduce_stats(total, rows, name, dst=owner)
            if total is None:
                return None
        return total * (2.0 / rows)

    def remove_hooks(self):
        """Stop accumulating (the sums are kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._shared.clear()


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs_ = args, kwargs


def _is_cache(value) -> bool:
    # key/value caches (passed by keyword, or positionally as GPT-2's blocks take them) would grow
    # at every replay of a block: they are dropped
    return type(value).__name__.endswith("Cache")


def _clean(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args = tuple(None if _is_cache(a) else a for a in args)
    kw = {k: None if (k in _CACHE_KWARGS or _is_cache(v)) else v for k, v in kwargs.items()}
    if "use_cache" in kw:
        kw["use_cache"] = False
    return args, kw


def find_blocks(model, targets: list[LayerTarget]):
    """``(blocks, [(block index, targets)], rest)``: the ``nn.ModuleList`` holding most targets,
    its blocks' targets in order, and the targets outside it (calibrated last)."""
    names = {id(m): n for n, m in model.named_modules()}
    best, best_count = None, 0
    for lst in (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
        prefix = names[id(lst)] + "."
        count = sum(names[id(t.module)].startswith(prefix) for t in targets)
        if count > best_count:
            best, best_count = lst, count
    if best is None:
        return None, [], list(targets)
    prefix = names[id(best)] + "."
    per_block: dict[int, list[LayerTarget]] = {}
    rest = []
    for t in targets:
        n = names[id(t.module)]
        if n.startswith(prefix):
            per_block.setdefault(int(n[len(prefix) :].split(".")[0]), []).append(t)
        else:
            rest.append(t)
    return best, sorted(per_block.items()), rest


def _forward_all(model, data, loss_fn, stats: _Stats, desc: str, progress: bool) -> int:
    batches = 0
    for batch in tqdm(data, desc=desc, disable=not progress, leave=False):
        loss_fn(model, batch)
        stats.end_batch()
        batches += 1
    if batches == 0:
        raise ValueError("data yielded no batches: pass a re-iterable of calibration batches")
    return batches


def _capture(model, data, loss_fn, block, progress) -> list:
    inputs = []

    def hook(module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in tqdm(data, desc="calibration inputs", disable=not progress, leave=False):
            try:
                loss_fn(model, batch)
            except _Captured as c:
                inputs.append(_clean(c.args_, c.kwargs_))
            else:
                raise ValueError(
                    "loss_fn(model, batch) did not run the model's blocks: layer-wise "
                    "calibration needs the model's forward pass"
                )
    finally:
        handle.remove()
    if not inputs:
        raise ValueError("data yielded no batches: pass a re-iterable of calibration batches")
    return inputs


def _run_block(block, args, kwargs):
    out = block(*args, **kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _Limited:
    """The first ``n`` batches of ``data``, at every pass (the calibration set)."""

    def __init__(self, data, n):
        self.data, self.n = data, n

    def __iter__(self):
        return itertools.islice(iter(self.data), self.n)


@dataclass
class LayerwiseResult:
    estimate: float
    batches: int
    seconds_calibration: float
    seconds_solve: float
    seconds_fisher: float = 0.0
    seconds_reconstruct: float = 0.0
    #: fixed-mask reconstruction: the sums over layers of the damped error before and after, the
    #: most conjugate-gradient iterations and the largest final relative residual of any layer
    error_before: float = 0.0
    error_after: float = 0.0
    iterations: int = 0
    residual: float = 0.0

    def phases(self) -> dict:
        # the reconstruction runs inside each layer's solve: reported apart from it
        solve = self.seconds_solve - self.seconds_reconstruct
        out = {"calibration": self.seconds_calibration, "solve": max(solve, 0.0)}
        if self.seconds_fisher:
            out["output_fisher"] = self.seconds_fisher
        if self.seconds_reconstruct:
            out["reconstruct"] = self.seconds_reconstruct
        return out

    def reconstruction(self) -> dict | None:
        if not self.seconds_reconstruct:
            return None
        return {
            "error_before": self.error_before,
            "error_after": self.error_after,
            "max_iterations": self.iterations,
            "max_residual": self.residual,
        }


@dataclass(frozen=True)
class LayerPass:
    """What one calibration pass runs: the layer solver and the settings of its parts."""

    solver: object  # a :class:`~curvature.pruning.solvers.LayerSolver`
    diagonal: bool  # only ``diag(H)`` is needed
    batches: int  # calibration batches, over every rank
    sequential: bool  # each block calibrated on the outputs of the pruned blocks before it
    rel_damp: float  # damping of ``H`` as a fraction of its mean diagonal
    label: str  # the progress bar's name
    structure: object  # the mask's :class:`~curvature.pruning.masks.MaskStructure`
    progress: bool = True
    objective: object = None  # a :class:`~curvature.pruning.parts.FisherObjective`
    reconstruct: object = None  # a :class:`~curvature.pruning.parts.Reconstruct`
    products: torch.dtype = F64  # float type of each batch's X^T X (summed in float64)


def run(model, data, loss_fn, targets, sparsities, lp: LayerPass, masks, dense=None):
    """Prune ``targets`` (:class:`LayerTarget`) to ``sparsities[name]`` as ``lp`` says; masks go
    into ``masks`` (a :class:`~curvature.pruning.masks.MaskSet`, which may hold earlier masks).
    ``dense`` (``{name: [rows, cols] matrix}``): the weights a reconstruction pass after another
    method reproduces the outputs of (the layers' current weights otherwise)."""
    structure = lp.structure
    # reconstruction solves on the full H: Wanda then reads its diagonal
    diagonal = lp.diagonal and lp.reconstruct is None
    rank, size = distributed.world()  # batches counts every rank's calibration batches
    _enough_batches(lp.batches, size)
    # every pass reads the same batches in the same order (token weights must line up)
    data = _Limited(stages.Replayed(data), distributed.local_count(lp.batches, rank, size))
    result = LayerwiseResult(0.0, 0, 0.0, 0.0)
    fisher = None
    if lp.objective is not None:
        from curvature.pruning import fisher_objective

        if size > 1:
            raise ValueError(
                "objective='fisher' is not supported under torch.distributed yet; run it in "
                "one process"
            )
        t0 = time.perf_counter()
        raw = fisher_objective.collect(
            model, data, loss_fn, targets, progress=lp.progress, micro_batch=1
        )
        mix, token_mix = lp.objective.mix, lp.objective.token_mix
        fisher = {n: f.mixed(mix, token_mix) for n, f in raw.items()}
        result.seconds_fisher = time.perf_counter() - t0
    # uniform token weights (the default) leave H as it is, its products shared between layers
    token_weights = (
        {n: f.tokens for n, f in fisher.items()} if fisher and lp.objective.token_mix else None
    )

    def prune(group: list[LayerTarget], stats: _Stats):
        # across ranks, layer j of the group is solved by rank j % W (its statistics reduced to
        # that rank), then its weights and mask are broadcast: solve time falls by ~W
        t0 = time.perf_counter()
        solved, error = {}, None
        for j, t in enumerate(group):
            owner = j % size
            h = stats.result(t.name, owner=owner)
            if owner != rank or error is not None:
                continue
            fixed = masks.get(t.name)
            fixed = t.as_matrix_mask(fixed.to(t.param.device)) if fixed is not None else None
            try:
                solved[t.name] = lp.solver.prune_layer(
                    t.matrix(),
                    h,
                    sparsities[t.name],
                    structure,
                    fixed,
                    ratio=lp.rel_damp,
                    name=t.name,
                    row_weights=fisher[t.name].rows if fisher else None,
                )
                if lp.reconstruct is not None:
                    w0 = dense[t.name] if dense is not None else t.matrix()
                    solved[t.name] = _reconstruct(w0, h, solved[t.name], lp.reconstruct, result)
            except Exception as e:  # noqa: BLE001 - every rank raises it (below), none waits
                if size == 1:
                    raise
                error = e
        if size > 1:
            distributed.agree(error, "prune")
        for j, t in enumerate(group):
            new, mask, est = (
                distributed.broadcast_layer(solved.get(t.name), t.matrix(), j % size)
                if size > 1
                else solved[t.name]
            )
            t.write(new)
            masks.update(t.name, t.as_param_mask(mask))
            result.estimate += est
        result.seconds_solve += time.perf_counter() - t0

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            calibrate = _sequential if lp.sequential else _parallel
            calibrate(model, data, loss_fn, targets, (diagonal, lp), prune, result, token_weights)
    finally:
        model.train(was_training)
    masks.apply(model)
    if size > 1 and lp.reconstruct is not None:  # each rank reconstructed the layers it solved
        result.error_before = distributed.allreduce_sum(result.error_before)
        result.error_after = distributed.allreduce_sum(result.error_after)
        result.iterations = int(distributed.allreduce_max(float(result.iterations)))
        result.residual = distributed.allreduce_max(result.residual)
        result.seconds_reconstruct = distributed.allreduce_max(result.seconds_reconstruct)
    return result


def _reconstruct(w0, h, solved, part, result: LayerwiseResult):
    """The solver's mask with the weights that best reproduce ``w0``'s outputs on the layer's
    inputs (:mod:`.reconstruct`)."""
    from curvature.pruning import layer_obs, reconstruct

    t0 = time.perf_counter()
    new, mask, est = solved
    w0, hp = layer_obs.prepare(w0, h)  # dead inputs: weight 0, diagonal 1
    rec = reconstruct.reconstruct(
        w0,
        hp,
        mask,
        start=new,
        ratio=part.rel_damp,
        tol=part.tol,
        max_iter=part.iters,
    )
    result.error_before += rec.error_before
    result.error_after += rec.error_after
    result.iterations = max(result.iterations, rec.iterations)
    result.residual = max(result.residual, rec.residual)
    result.seconds_reconstruct += time.perf_counter() - t0
    # the estimate: half the damped output error of the layer, as the solvers' OBS estimates
    return rec.weights, mask, 0.5 * rec.error_after


def _enough_batches(batches: int, size: int) -> None:
    """Every process reads at least one calibration batch (the same check on every rank: all
    raise together)."""
    if batches < size:
        raise ValueError(
            f"prune: batches={batches} calibration batches for {size} processes: "
            "every process needs at least one; raise batches"
        )


def outlier_sparsities(model, data, loss_fn, targets, sparsity, how) -> dict[str, float]:
    """Per-layer targets from outlier activations (the ``outlier`` allocation part).

    One forward pass of the dense model over the calibration batches gives each layer's input
    norms ``||X_j||``; a layer's scores are ``|W_ij| ||X_j||``, a group is a block of the model
    (the layers of one repeated block together, as the published rule does; a layer outside the
    blocks is its own group), and its outlier ratio is the share of its scores above
    ``m`` times their mean. :func:`~curvature.pruning.allocation.outlier_targets` turns the
    ratios into targets within ``sparsity +- lam`` whose average weighted by size is
    ``sparsity``; every layer of a group gets its group's target. ``how``: ``(part, context)``,
    the :class:`~curvature.pruning.parts.Outlier` part and the call's ``batches`` and
    ``progress``.
    """
    from curvature.pruning.allocation import outlier_ratio, outlier_targets

    part, context = how
    rank, size = distributed.world()
    _enough_batches(context.batches, size)
    data = _Limited(stages.Replayed(data), distributed.local_count(context.batches, rank, size))
    stats = _Stats(targets, diagonal=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _forward_all(model, data, loss_fn, stats, "outlier scores", context.progress)
    finally:
        stats.remove_hooks()
        model.train(was_training)
    _, per_block, rest = find_blocks(model, targets)
    groups = [g for _, g in per_block] + [[t] for t in rest]
    ratios, sizes = [], []
    for g in groups:
        scores = [
            t.matrix().abs() * torch.sqrt(stats.result(t.name).clamp_min(0))[None, :] for t in g
        ]
        ratios.append(outlier_ratio(scores, part.m))
        sizes.append(sum(t.param.numel() for t in g))
    per_group = outlier_targets(ratios, sizes, sparsity, part.lam)
    return {t.name: s for g, s in zip(groups, per_group) for t in g}


def _timed_stats(result, fn):
    t0 = time.perf_counter()
    out = fn()
    result.seconds_calibration += time.perf_counter() - t0
    return out


def _sequential(model, data, loss_fn, targets, how, prune, result, weights=None):
    diagonal, lp = how
    blocks, per_block, rest = find_blocks(model, targets)
    if per_block:
        first = per_block[0][0]
        inputs = _timed_stats(
            result, lambda: _capture(model, data, loss_fn, blocks[first], lp.progress)
        )
        result.batches = len(inputs)
        wanted = dict(per_block)
        last = per_block[-1][0]
        bar = tqdm(range(first, last + 1), desc=f"{lp.label} blocks", disable=not lp.progress)
        for i in bar:
            block = blocks[i]
            group = wanted.get(i, [])
            if group:
                stats = _Stats(group, diagonal, weights, lp.products)

                def calibrate(block=block, stats=stats, inputs=inputs):
                    for a, kw in inputs:
                        block(*a, **kw)
                        stats.end_batch()

                try:
                    _timed_stats(result, calibrate)
                    prune(group, stats)
                finally:
                    stats.remove_hooks()
            if i < last:
                inputs = _timed_stats(
                    result,
                    lambda block=block, inputs=inputs: [
                        _run_block(block, a, kw) for a, kw in inputs
                    ],
                )
        del inputs
    if rest:
        stats = _Stats(rest, diagonal, weights, lp.products)
        try:
            n = _timed_stats(
                result,
                lambda: _forward_all(
                    model, data, loss_fn, stats, "calibration (other layers)", lp.progress
                ),
            )
            result.batches = result.batches or n
            prune(rest, stats)
        finally:
            stats.remove_hooks()


def _parallel(model, data, loss_fn, targets, how, prune, result, weights=None):
    diagonal, lp = how
    # every layer's statistics at once, from the dense model
    stats = _Stats(targets, diagonal, weights, lp.products)
    try:
        result.batches = _timed_stats(
            result,
            lambda: _forward_all(model, data, loss_fn, stats, "calibration", lp.progress),
        )
    finally:
        stats.remove_hooks()
    prune(targets, stats)


def drive(model, data, loss_fn, call, pipeline, masks) -> PruneReport:
    """The layer-wise driver: every selected linear layer pruned to its target by the pipeline's
    layer-wise chooser, with its objective and reconstruction parts in the same pass."""
    start = time.perf_counter()
    chooser = pipeline.chooser
    named, skipped = select_for(model, call)
    targets = layer_targets(model, named)
    structure = call.structure
    for t in targets:  # N:M runs along the input dimension of the layer
        if t.cols % structure.run:
            raise ValueError(
                f"parameter {t.name} has {t.cols} inputs, not divisible by the {structure.name} "
                f"group of {structure.run}; exclude it from params"
            )
    per = call.targets()
    sparsities = {t.name: per.get(t.name, per.get("")) for t in targets}
    curvature = chooser.curvature()
    lp = LayerPass(
        solver=chooser.solver(),
        diagonal=curvature.diagonal,
        batches=chooser.batches,
        sequential=chooser.sequential,
        rel_damp=chooser.rel_damping,
        label=chooser.label,
        structure=structure,
        progress=call.progress,
        objective=pipeline.objective,
        reconstruct=pipeline.reconstruct,
        products=chooser.dtype,
    )
    res = run(model, data, loss_fn, targets, sparsities, lp, masks)
    reached = {t.name: float(masks.get(t.name).float().mean()) for t in targets}
    total = sum(t.param.numel() for t in targets)
    report = PruneReport(
        method=chooser.label,
        mask=structure.name,
        selection=("sequential" if chooser.sequential else "parallel"),
        target_sparsity=sum(sparsities[t.name] * t.param.numel() for t in targets) / total,
        global_sparsity=sum(reached[t.name] * t.param.numel() for t in targets) / total,
        param_sparsity=reached,
        estimated_loss_increase=res.estimate,
        gradients=0,
        seconds=time.perf_counter() - start,
        distinct_batches=res.batches,
        skipped=skipped,
        # the statistics of the largest layer (sequential: one block's at a time)
        memory_plan={"curvature": max(curvature.estimate_bytes(t) for t in targets)},
        phases=res.phases(),
        reconstruction=res.reconstruction(),
        masks=masks,
    )
    if distributed.active():  # one report on every rank: rank 0's clock, all ranks' batches
        report.seconds = distributed.broadcast_float(report.seconds)
        report.distinct_batches = int(distributed.allreduce_sum(report.distinct_batches or 0))
    return report
