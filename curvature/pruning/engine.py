"""One-shot pruning of any ``torch.nn.Module``: the engine that runs a pipeline of parts.

A method (:mod:`curvature.pruning.registry`) is a pipeline of parts
(:mod:`curvature.pruning.parts`): one chooser and at most one allocation, objective and
reconstruction. :func:`run` checks the pipeline against the call's settings, lets an allocation
part give each layer its target, and hands the rest to the chooser's driver:

- the gradient driver (:mod:`curvature.pruning.gradient_driver`): gradients, curvature, scores,
  allocation, update, in memory groups, sharded under ``torch.distributed``;
- the layer-wise driver (:func:`curvature.pruning.layerwise.drive`): capture, calibrate, solve
  per layer, replay.

Under an initialised ``torch.distributed`` process group of several processes, ``prune`` is called
on every rank with that rank's shard of the batches; every rank ends with the same model, masks
and report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from types import SimpleNamespace

import torch

from curvature.pruning import distributed, gradient_driver, layerwise, stages
from curvature.pruning.curvatures import EmpiricalFisher
from curvature.pruning.masks import MaskSet
from curvature.pruning.params import select_params
from curvature.pruning.registry import pipeline as as_pipeline
from curvature.pruning.report import PruneReport
from curvature.pruning.settings import PruneSettings

#: the driver of each kind of chooser (``Chooser.driver``)
DRIVERS = {"gradient": gradient_driver.run, "layer": layerwise.drive}

__all__ = ["DRIVERS", "PruneReport", "collect_fisher", "prune", "run"]


def collect_fisher(model, data, loss_fn, targets, fisher: EmpiricalFisher, progress=True):
    """Stream ``fisher.gradients`` gradients (one per batch, cycling over ``data``) into the
    Fisher inverses of ``targets`` (:class:`~curvature.pruning.targets.Target`). Returns
    ``{name: FisherInverse}``."""
    grads = stages.collect_gradients(
        model, data, loss_fn, targets, gradients=fisher.gradients, progress=progress
    )
    built = fisher.build(targets, grads, None)
    return {n: b.fisher for n, b in built.items()}


def prune(
    model: torch.nn.Module,
    data: Iterable,
    *,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    sparsity: float,
    method="obs",
    mask: str = "unstructured",
    params: str | list[str] = "__ALL_PRUNABLE__",
    global_sparsity: bool | None = None,
    masks: MaskSet | None = None,
    max_memory: int | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` and return a :class:`PruneReport`.

    Args:
        model: any module; its selected weights are overwritten.
        data: a re-iterable of batches (a list or a ``DataLoader``): one gradient per batch for
            the gradient methods, the calibration set (forward passes of ``loss_fn``) for the
            layer-wise ones.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        sparsity: target fraction of zeros over the selected parameters, in ``[0, 1)`` (for
            ``N:M`` masks it must be ``1 - N/M``); or a mapping ``{parameter name: sparsity}``,
            a target per parameter (``params`` is then those names).
        method: a preset name (``curvature.pruning.METHODS.names()``: ``"obs"``,
            ``"obs-independent"``, ``"mfac"``, ``"magnitude"``, ``"sparsegpt"``, ``"obc"``,
            ``"wanda"``), optionally with added parts (``"sparsegpt+reconstruct+outlier+fisher"``);
            or a part or a pipeline of parts (:func:`curvature.pruning.parts.chain`), each with
            its own settings: ``OBS(gradients=64, fisher_damping=1e-6)``.
        mask: ``"unstructured"``, ``"block4"`` or ``"N:M"`` such as ``"2:4"``.
        params: names, ``re:`` patterns or ``__ALL_PRUNABLE__``.
        global_sparsity: one threshold across all parameters (``True``, the default of the
            gradient methods) or the target per layer (``False``, the only choice of the
            layer-wise methods).
        masks: weights pruned earlier (kept pruned; counted toward the target).
        max_memory: bytes the Fisher blocks may take (default: 60% of the available memory).
        progress: progress bars.
    """
    pipe = as_pipeline(method)
    if global_sparsity is None:
        global_sparsity = pipe.chooser.global_default
    call = PruneSettings(
        sparsity,
        mask=mask,
        params=params,
        global_sparsity=global_sparsity,
        max_memory=max_memory,
        progress=progress,
    )
    return run(model, data, loss_fn, call, pipe, masks=masks)


def run(model, data, loss_fn, call: PruneSettings, pipeline, *, masks: MaskSet | None = None):
    """Prune ``model`` with ``pipeline`` (a method name, part or pipeline) and the call-wide
    settings ``call``; the engine behind :func:`prune`."""
    start = time.perf_counter()
    pipeline = as_pipeline(pipeline)
    pipeline.check(call)
    _refuse_sharded_params(model)
    masks = masks if masks is not None else MaskSet()
    if pipeline.added:  # every pass of every part reads the same batches
        data = stages.Replayed(data)
    allocated, seconds = None, 0.0
    if pipeline.allocation is not None:
        t0 = time.perf_counter()
        lin = layerwise.layer_targets(model, select_params(model, call.param_list))
        context = SimpleNamespace(batches=pipeline.batches, progress=call.progress)
        allocated = pipeline.allocation.allocate(model, data, loss_fn, lin, call.sparsity, context)
        seconds = time.perf_counter() - t0
        call = PruneSettings(
            allocated,
            mask=call.mask,
            global_sparsity=call.global_sparsity,
            max_memory=call.max_memory,
            progress=call.progress,
        )
    report = DRIVERS[pipeline.chooser.driver](model, data, loss_fn, call, pipeline, masks)
    report.method = pipeline.spec  # the method with its parts
    if allocated is not None:
        report.allocation = allocated
        report.phases = {f"{pipeline.allocation.label}_allocation": seconds, **report.phases}
    report.seconds = time.perf_counter() - start
    if distributed.active():  # one report on every rank: rank 0's clock
        report.seconds = distributed.broadcast_float(report.seconds)
    return report


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
