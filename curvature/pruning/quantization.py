"""Quantizing a model's linear layers: the :class:`Quantize` part and its layer-wise pass.

:func:`quantize_model` rounds every selected linear layer (``nn.Linear``, all of them by default)
to the part's grid. ``method="gptq"`` runs the layer-wise calibration of the pruning methods
(:mod:`curvature.pruning.layerwise`: block by block, each block calibrated on the outputs of the
blocks already quantized) and sweeps each layer with :func:`curvature.pruning.quantize.gptq`;
``"rtn"`` rounds to nearest without data. Weights that are zero stay zero, so it composes after
any pruning (unstructured, N:M, structured); with ``sparsity`` or an ``N:M`` ``mask`` the GPTQ sweep
also prunes (SparseGPT's joint mode: one sweep chooses the mask and rounds the kept weights).

The result keeps every layer's integer codes, scales, zero points and the group of each column
(:class:`~curvature.pruning.quantize.Quantized`) for a packed checkpoint; the model itself holds
the dequantized weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from curvature.core import checks
from curvature.pruning import layerwise, quantize
from curvature.pruning.masks import MaskSet, parse_mask
from curvature.pruning.quantize import Grid
from curvature.pruning.solvers import LayerSolver

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class Quantize:
    """A quantizer with its own settings: ``bits`` (2, 3, 4, 8), ``group`` input columns per scale
    (``None``: one per output channel), ``symmetric``, ``method`` (``gptq`` or ``rtn``); GPTQ's
    ``act_order``, ``static_groups``, ``rel_damp`` (a fraction of ``H``'s mean diagonal), ``block``
    (columns per lazy batch), ``batches`` (calibration batches) and ``sequential``.

    ``embedding_bits``: also round the input embedding table to that many bits, one scale per token
    (its row), symmetric or not as the linear layers. Round-to-nearest is the second-order choice
    there: an embedding's inputs are one-hot, so its layer Hessian ``X^T X`` is diagonal and OBQ
    (or GPTQ) on a diagonal Hessian corrects nothing; each row is rounded alone.

    ``precision``: the float type of the GPTQ sweep and of each calibration batch's ``X^T X``
    product (summed over batches in float64 either way): ``float64`` (the default, what the
    tests compare with exact OBQ) or ``float32`` (the reference implementation's; faster,
    measured in ``scripts/bench_quant.py`` and ``scripts/bench_pruning.py --part reference``)."""

    bits: int = 4
    group: int | None = 128
    symmetric: bool = False
    method: str = "gptq"
    act_order: bool = False
    static_groups: bool = False
    rel_damp: float = 0.01
    block: int = 128
    batches: int = 128
    sequential: bool = True
    embedding_bits: int | None = None
    precision: str = "float64"
    label: ClassVar[str] = "quantize"

    def __post_init__(self):
        self.grid()  # bits, group, symmetric
        if self.embedding_bits is not None:
            self.embedding_grid()
        checks.one_of("method", self.method, METHODS)
        checks.one_of("precision", self.precision, ("float64", "float32"))
        for name in ("act_order", "static_groups", "sequential", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        checks.positive("rel_damp", self.rel_damp)
        checks.positive_int("block", self.block)
        checks.positive_int("batches", self.batches)
        if self.method == "rtn" and (self.act_order or self.static_groups):
            raise ValueError(
                "act_order and static_groups are GPTQ settings; method rtn has neither"
            )
        if self.static_groups and self.group is None:
            raise ValueError("static_groups needs a group size (group is None: per channel)")
        gptq_only = {
            "rel_damp": 0.01, "block": 128, "batches": 128, "sequential": True,
            "precision": "float64",
        }  # fmt: skip
        changed = [k for k, v in gptq_only.items() if getattr(self, k) != v]
        if self.method == "rtn" and changed:
            raise ValueError(
                f"{changed[0]} is a GPTQ setting; method rtn reads no data and would ignore it"
            )

    @property
    def dtype(self) -> torch.dtype:
        """The float type of the calibration products and of the sweep (``precision``)."""
        return getattr(torch, self.precision)

    def grid(self) -> Grid:
        return Grid(bits=self.bits, group=self.group, symmetric=self.symmetric)

    def embedding_grid(self) -> Grid:
        try:
            return Grid(bits=self.embedding_bits, group=None, symmetric=self.symmetric)
        except ValueError as exc:
            raise ValueError(f"embedding_{exc}") from None

    @property
    def name(self) -> str:
        g = f"g{self.group}" if self.group else "per-channel"
        extra = "+act-order" if self.act_order else ""
        return f"{self.method} {self.bits}-bit {g}{extra}"


class _Solver(LayerSolver):
    """GPTQ (joint with pruning when asked) as a layer solver; results kept by layer name."""

    name = "gptq"
    needs_inverse = True

    def __init__(self, part: Quantize, results: dict):
        self.part, self.results = part, results

    def prune_layer(self, w, stats, sparsity, structure, fixed, *, ratio, name, row_weights=None):
        p = self.part
        q = quantize.gptq(
            w, stats, p.grid(), rel_damp=ratio, block=p.block, act_order=p.act_order,
            static_groups=p.static_groups, sparsity=sparsity, nm=structure.nm, fixed=fixed,
            name=name, dtype=p.dtype,
        )  # fmt: skip
        self.results[name] = q
        mask = q.mask if q.mask is not None else (w == 0) if fixed is None else fixed
        return q.weight, mask, q.estimate


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` did: the part, every layer's :class:`Quantized`, the error
    estimate, seconds and calibration batches."""

    part: Quantize
    layers: dict = field(default_factory=dict)
    estimate: float = 0.0
    seconds: float = 0.0
    batches: int = 0
    phases: dict = field(default_factory=dict)
    #: the input embedding table's name and :class:`Quantized`, when ``embedding_bits`` is set
    embedding: tuple | None = None


def embedding_weight(model) -> tuple[str, torch.Tensor]:
    """``(name, weight)`` of the input embedding table; one clear line if an output head shares
    it (the head would be rounded with it, which nothing here calibrates)."""
    emb = model.get_input_embeddings()
    name = next(n for n, p in model.named_parameters() if p is emb.weight)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and out.weight is emb.weight:
        raise ValueError(
            f"embedding_bits: {name} is tied to the output head, which would be rounded with it; "
            "leave embedding_bits unset for a model with tied embeddings"
        )
    return name, emb.weight


def quantize_embedding(model, part: Quantize) -> tuple[str, quantize.Quantized]:
    """Round the input embedding table to ``part.embedding_bits``, one scale per row."""
    name, weight = embedding_weight(model)
    q = quantize.rtn(weight.detach(), part.embedding_grid(), name=name)
    with torch.no_grad():
        weight.copy_(q.weight.to(weight.dtype))
    return name, q


def linear_weights(model) -> list:
    """``[(name, weight)]`` of every linear layer (``nn.Linear``, GPT-2's ``Conv1D``), except a
    weight shared with another module (an output head tied to the input embeddings), which is
    left in full precision, and a layer with no weights left (a module removed whole)."""
    owner = {}
    for n, p in model.named_parameters():  # a shared weight is listed once, under its first owner
        owner[id(p)] = n
    out = []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or layerwise._is_conv1d(m):
            name = f"{n}.weight" if n else "weight"
            if owner.get(id(m.weight)) == name and m.weight.numel():
                out.append((name, m.weight))
    return out


def _linear_weights(model, params):
    named = dict(model.named_parameters())
    if params is None:
        return linear_weights(model)
    missing = [p for p in params if p not in named]
    if missing:
        import difflib

        near = difflib.get_close_matches(missing[0], list(named), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"params: {missing[0]!r} is not a parameter of the model{hint}")
    return [(p, named[p]) for p in params]


def quantize_model(
    model, data, loss_fn, part: Quantize, *, params=None, sparsity=0.0, mask="unstructured",
    progress=True,
) -> QuantizeReport:  # fmt: skip
    """Quantize ``params`` (linear weights; default every ``nn.Linear``) of ``model`` in place as
    ``part`` says; ``sparsity``/``mask``: prune in the same sweep (GPTQ only)."""
    start = time.perf_counter()
    if not isinstance(part, Quantize):
        raise TypeError(f"part must be a Quantize, got {type(part).__name__}")
    structure = parse_mask(mask)
    checks.in_range("sparsity", sparsity, 0.0, 1.0, "[)")
    joint = bool(sparsity) or structure.nm is not None
    if joint and part.method != "gptq":
        raise ValueError("pruning in the quantization sweep needs method gptq")
    if structure.name == "block4":
        raise ValueError("mask block4 cannot be chosen in the quantization sweep; use N:M")
    targets = layerwise.layer_targets(model, _linear_weights(model, params))
    if part.embedding_bits is not None:
        embedding_weight(model)  # refused before any work when tied
    for t in targets:
        part.grid().check_layer(t.cols, t.name)
        if structure.nm and t.cols % structure.nm[1]:
            raise ValueError(f"{t.name} has {t.cols} inputs, not a multiple of {structure.name}")
    report = QuantizeReport(part)
    if part.embedding_bits is not None:
        report.embedding = quantize_embedding(model, part)
    if part.method == "rtn":
        for t in targets:
            q = quantize.rtn(t.matrix(), part.grid(), name=t.name)
            t.write(q.weight)
            report.layers[t.name] = q
        report.seconds = time.perf_counter() - start
        return report
    masks = MaskSet()
    for t in targets:  # zeros already there (an earlier pruning) stay zero
        zero = t.param.detach() == 0
        if bool(zero.any()):
            masks.update(t.name, zero)
    lp = layerwise.LayerPass(
        solver=_Solver(part, report.layers),
        diagonal=False,
        batches=part.batches,
        sequential=part.sequential,
        rel_damp=part.rel_damp,
        label="gptq",
        structure=structure,
        progress=progress,
        products=part.dtype,
    )
    res = layerwise.run(
        model, data, loss_fn, targets, dict.fromkeys((t.name for t in targets), sparsity), lp, masks
    )
    report.estimate, report.batches = res.estimate, res.batches
    report.phases = res.phases()
    report.seconds = time.perf_counter() - start
    return report


def bits_per_parameter(report: QuantizeReport, scale_bits: int = 16) -> dict:
    """Bits of the quantized layers per weight: codes plus one scale (``scale_bits``, as a float16
    checkpoint stores it) and, for an asymmetric grid, one zero point of as many bits per group
    (a symmetric grid's zero point is implied)."""
    weights = sum(q.codes.numel() for q in report.layers.values())
    groups = sum(q.scales.numel() for q in report.layers.values())
    per_group = scale_bits * (1 if report.part.symmetric else 2)
    bits = report.part.bits * weights + per_group * groups
    out = {"weights": weights, "groups": groups, "bits_per_weight": bits / max(weights, 1)}
    if report.embedding is not None:
        q = report.embedding[1]
        e_bits = report.part.embedding_bits * q.codes.numel() + per_group * q.scales.numel()
        out["embedding_bits_per_weight"] = e_bits / q.codes.numel()
    return out
