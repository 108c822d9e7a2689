"""Recipe modifiers: strict pydantic models in the recipe format's own field names.

Every modifier rejects unknown fields (``extra="forbid"``) and checks ranges; the loader turns the
errors into messages with the recipe line and the nearest valid field name. Fields that only made
sense in another runtime (device lists, gradient buffering switches) are accepted and logged with
what this toolkit does instead (:data:`RUNTIME_ONLY_FIELDS`).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curvature.core import checks
from curvature.pruning import METHODS, parts
from curvature.pruning.masks import parse_mask
from curvature.pruning.registry import pipeline, split_spec
from curvature.pruning.schedule import interpolate, pruning_points

log = logging.getLogger(__name__)

#: fields accepted for compatibility that change nothing here, and what happens instead
RUNTIME_ONLY_FIELDS = {
    "available_gpus": "the Fisher is built on the device of the model's parameters",
    "available_devices": "the Fisher is built on the device of the model's parameters",
    "grads_device": "gradients stream into the Fisher on the parameters' device; none are buffered",
    "num_pages": "the memory plan splits parameters into groups (max_memory) instead of pages",
    "use_gradient_buffering": "gradients are always sampled from the training data at each point",
    "log_types": "logging goes through the Trainer's loggers (TrainingArguments.report_to)",
    "constant_logging": "the Trainer logs the learning rate the recipe applies at every step",
}


def _note_runtime_fields(modifier, fields) -> None:
    for name in fields:
        value = getattr(modifier, name, None)
        if value is not None:
            log.info(
                "%s: %s=%r accepted for compatibility; %s",
                type(modifier).__name__,
                name,
                value,
                RUNTIME_ONLY_FIELDS[name],
            )


class Modifier(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    start_epoch: float = Field(0.0, ge=-1)
    end_epoch: float = Field(-1.0, ge=-1)
    # Where the modifier was defined (set by the loader, not a recipe field).
    line: int | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _order(self):
        if self.end_epoch != -1 and self.end_epoch < self.start_epoch:
            raise ValueError(
                f"end_epoch ({self.end_epoch}) is before start_epoch ({self.start_epoch})"
            )
        return self

    @model_validator(mode="after")
    def _runtime_only(self):
        _note_runtime_fields(self, [f for f in RUNTIME_ONLY_FIELDS if f in type(self).model_fields])
        return self


def modifier_kind(pipe: parts.Pipeline) -> type:
    """The pruning modifier that runs ``pipe`` in a recipe (layer-wise, gradient OBS or
    magnitude); its ``PART_FIELDS`` are the part settings a recipe can carry for it."""
    if pipe.layerwise:
        return LayerwisePruningModifier
    return OBSPruningModifier if pipe.needs_gradients else MagnitudePruningModifier


class EpochRangeModifier(Modifier):
    pass


def _registered_method(name: str, kind: str) -> str:
    """``name`` if it is a registered method with the property ``kind`` (one clear error naming
    the nearest such method otherwise); ``base+part`` names add parts (``sparsegpt+reconstruct``)."""
    base, _ = split_spec(name)
    checks.one_of("method", base, [m for m in METHODS.names() if getattr(METHODS[m], kind)])
    return name


def _with(pipe: parts.Pipeline, values: dict) -> parts.Pipeline:
    """``pipe`` with the settings of its parts set from a recipe's published fields; ``values``
    are ``setting: (value, the modifier's default)``. A value other than the default for a
    setting no part has is refused with one line."""
    have = pipe.settings()
    for k, (v, default) in values.items():
        if k not in have and v != default:
            raise ValueError(
                f"method {pipe.spec} has no setting {k!r}; the recipe's value {v!r} would be "
                "ignored: remove it or choose a method that reads it"
            )
    return pipe.with_settings(**{k: v for k, (v, _) in values.items() if k in have})


class _Pruning(Modifier):
    params: list[str] | str = "__ALL_PRUNABLE__"
    init_sparsity: float = Field(0.0, ge=0, lt=1)
    # a sparsity for all ``params``, or {sparsity: [parameter names or re: patterns]} with
    # ``params: []`` (a target per group of layers)
    final_sparsity: float | dict[float, list[str]]
    update_frequency: float = Field(1.0, ge=0)
    inter_func: Literal["cubic", "linear", "inverse_cubic"] = "cubic"
    global_sparsity: bool = True
    leave_enabled: bool = True
    mask_type: str = "unstructured"
    log_types: Any = None  # accepted for compatibility; logging goes through the trainer
    #: the registered pruning method this modifier runs (``curvature.pruning.METHODS``)
    METHOD: ClassVar[str] = "magnitude"

    @property
    def method(self) -> str:
        """``method:`` where the modifier has that field, else the modifier's own method."""
        return getattr(self, "method_name", self.METHOD)

    def engine_settings(self, reached: float = 0.0) -> dict:
        """Keywords of :func:`curvature.pruning.prune` for one pruning point of this modifier
        (``reached``: the sparsity the pruned parameters have before it)."""
        return dict(
            method=self.pipeline(reached),
            mask=self.mask_type,
            params=self.params,
            global_sparsity=self.global_sparsity,
        )

    #: the one mapping of published field names to the parts' settings: ``{setting: field}``
    #: (``num_grads`` is ``gradients``, ``damp`` is ``fisher_damping`` or ``rel_damp``, ...)
    PART_FIELDS: ClassVar[dict[str, str]] = {}

    def pipeline(self, reached: float = 0.0) -> parts.Pipeline:
        """The parts this modifier runs, its published fields mapped onto their settings."""
        fields = type(self).model_fields
        run = parse_mask(self.mask_type).run  # magnitude's blocks: the mask's group
        values = {"block_size": (run, run)}
        for setting, name in self.PART_FIELDS.items():
            value = self.grads_at(reached) if name == "num_grads" else getattr(self, name)
            values[setting] = (value, fields[name].default)
        return _with(pipeline(self.method), values)

    def retarget(
        self, *, method: str, sparsity: float, mask: str, settings: dict, params, per_layer: bool
    ) -> _Pruning:
        """This modifier switched to ``method`` at ``sparsity`` with ``mask``, the parts'
        ``settings`` given (``None``: the recipe's own value) written as the published fields of
        the modifier ``method`` needs (layer-wise, magnitude or gradient OBS)."""
        pipe = pipeline(method)
        kind = modifier_kind(pipe)
        fields = self.model_dump()
        fields.update(
            final_sparsity=sparsity, init_sparsity=min(self.init_sparsity, sparsity), mask_type=mask
        )
        if kind is LayerwisePruningModifier and not isinstance(self, kind):
            fields.pop("damp", None)  # a layer-wise damp is relative; an OBS one is absolute
        if params is not None:
            fields["params"] = params
        for setting, name in kind.PART_FIELDS.items():
            if settings.get(setting) is not None:
                fields[name] = settings[setting]
        if per_layer or kind is LayerwisePruningModifier:
            fields["global_sparsity"] = False
        fields = {k: v for k, v in fields.items() if k in kind.model_fields}
        if "method_name" in kind.model_fields:
            fields["method_name"] = method
        return kind(**fields)

    @property
    def needs_data(self) -> bool:
        """Whether a pruning point reads data and a loss (gradients, or calibration inputs)."""
        return pipeline(self.method).needs_data

    @field_validator("params")
    @classmethod
    def _params(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("final_sparsity")
    @classmethod
    def _final(cls, v):
        for s in v if isinstance(v, dict) else [v]:
            if s < 0:
                raise ValueError("Input should be greater than or equal to 0")
            if s >= 1:
                raise ValueError("Input should be less than 1")
        return v

    def progress(self) -> list[tuple[float, float]]:
        """``(epoch, interpolated progress in [0, 1])`` at every pruning point of this modifier."""
        end = self.end_epoch if self.end_epoch != -1 else self.start_epoch
        span = end - self.start_epoch
        points = pruning_points(
            start_epoch=self.start_epoch, end_epoch=end, update_frequency=self.update_frequency
        )
        return [
            (e, interpolate(1.0 if span <= 0 else (e - self.start_epoch) / span, self.inter_func))
            for e in points
        ]

    def finals(self) -> dict[float, list[str]]:
        """``{final sparsity: params}``: one entry unless ``final_sparsity`` is a mapping."""
        if isinstance(self.final_sparsity, dict):
            return dict(self.final_sparsity)
        return {self.final_sparsity: list(self.params)}

    def target_at(self, progress: float, final: float) -> float:
        return self.init_sparsity + (final - self.init_sparsity) * progress

    def schedule(self) -> list[tuple[float, float]]:
        """``(epoch, target sparsity)`` at every pruning point (the highest final's target when
        ``final_sparsity`` is a mapping)."""
        top = max(self.finals())
        return [(e, self.target_at(x, top)) for e, x in self.progress()]

    @field_validator("mask_type")
    @classmethod
    def _mask(cls, v):
        parse_mask(v)
        return "block4" if v == "block" else v

    @model_validator(mode="after")
    def _sparsities(self):
        if isinstance(self.final_sparsity, dict):
            if self.params:
                raise ValueError(
                    "final_sparsity is a mapping of sparsity to parameters: set params: [] "
                    f"(got params {self.params})"
                )
            if not self.final_sparsity:
                raise ValueError("final_sparsity mapping is empty")
        elif not self.params:
            raise ValueError(
                "params is empty: name the parameters to prune or use __ALL_PRUNABLE__"
            )
        nm = parse_mask(self.mask_type).fixed_sparsity
        for final in self.finals():
            if not 0.0 <= final < 1.0:
                raise ValueError(f"final_sparsity {final} is outside [0, 1)")
            if final < self.init_sparsity:
                raise ValueError(
                    f"final_sparsity ({final}) is below init_sparsity ({self.init_sparsity})"
                )
            if nm is not None and abs(final - nm) > 1e-9:
                raise ValueError(f"mask_type {self.mask_type} needs final_sparsity {nm:g}")
        if nm is not None and len(self.progress()) > 1 and abs(self.init_sparsity - nm) > 1e-9:
            raise ValueError(
                f"mask_type {self.mask_type} prunes exactly {nm:g} at every pruning point: set "
                f"init_sparsity to {nm:g} (got {self.init_sparsity}), or start_epoch = end_epoch"
            )
        return self


class MagnitudePruningModifier(_Pruning):
    pass


class GlobalMagnitudePruningModifier(_Pruning):
    global_sparsity: bool = True

    @field_validator("global_sparsity")
    @classmethod
    def _global(cls, v):
        if not v:
            raise ValueError(
                "GlobalMagnitudePruningModifier is global by definition; "
                "use !MagnitudePruningModifier for per-layer targets"
            )
        return v


class GMPruningModifier(_Pruning):
    """Gradual magnitude pruning in its other spelling: per-layer targets unless
    ``global_sparsity: true``."""

    global_sparsity: bool = False
    phased: bool = False

    @field_validator("phased")
    @classmethod
    def _phased(cls, v):
        if v:
            raise ValueError(
                "phased pruning (alternating pruned and dense phases) is not supported"
            )
        return v


class OBSPruningModifier(_Pruning):
    num_grads: int = Field(1024, gt=0)
    damp: float = Field(1e-7, gt=0)
    fisher_block_size: int = Field(50, gt=0)
    grad_sampler_kwargs: dict[str, Any] = Field(default_factory=dict)
    num_recomputations: int = Field(1, ge=1)
    selection: Literal["greedy", "independent"] = "greedy"
    # Not a field of the published recipes: any registered gradient-curvature method.
    method_name: str = Field("obs", alias="method")

    @field_validator("method_name")
    @classmethod
    def _method(cls, v):
        return _registered_method(v, "needs_gradients")

    PART_FIELDS: ClassVar[dict[str, str]] = {
        "gradients": "num_grads",
        "block_size": "fisher_block_size",
        "fisher_damping": "damp",
        "recomputations": "num_recomputations",
        "selection": "selection",
    }

    def grads_at(self, sparsity: float) -> int:
        """Gradients to collect when the pruned parameters are at ``sparsity``."""
        return self.num_grads

    @model_validator(mode="after")
    def _block(self):
        run = parse_mask(self.mask_type).run
        if self.fisher_block_size % run:
            raise ValueError(
                f"fisher_block_size {self.fisher_block_size} is not a multiple of the "
                f"{self.mask_type} group of {run}"
            )
        unknown = set(self.grad_sampler_kwargs) - {"batch_size"}
        if unknown:
            raise ValueError(
                f"grad_sampler_kwargs: unknown key(s) {sorted(unknown)}; allowed: batch_size"
            )
        return self


class MFACPruningModifier(OBSPruningModifier):
    """M-FAC pruning: the OBS engine with the Fisher inverse in the M-FAC form, oBERT-style
    independent scores ``w^2 / (2 [F^-1]_qq)`` and summed corrections (the published method).

    ``num_grads`` may be ``{sparsity reached: gradients}`` (more gradients as the model gets
    sparser); ``0.0`` must be a key.
    """

    num_grads: int | dict[float, int] = 64
    damp: float = Field(1e-5, gt=0)
    fisher_block_size: int = Field(2000, gt=0)
    global_sparsity: bool = False
    selection: Literal["greedy", "independent"] = "independent"
    method_name: str = Field("mfac", alias="method")
    available_gpus: list[str] | None = None
    available_devices: list[str] | None = None
    grads_device: str | int | None = None
    num_pages: int | None = Field(None, ge=1)
    use_gradient_buffering: bool | None = None

    @field_validator("num_grads")
    @classmethod
    def _num_grads(cls, v):
        if isinstance(v, dict):
            if 0.0 not in v:
                raise ValueError(f"a num_grads mapping needs the key 0.0 (got keys {sorted(v)})")
            bad = {k: n for k, n in v.items() if not 0 <= k < 1 or n <= 0}
            if bad:
                raise ValueError(f"num_grads mapping: sparsities in [0, 1), counts > 0 (got {bad})")
        elif v <= 0:
            raise ValueError(f"num_grads must be > 0 (got {v})")
        return v

    def grads_at(self, sparsity: float) -> int:
        """Gradients to collect when the pruned parameters are at ``sparsity``."""
        if isinstance(self.num_grads, int):
            return self.num_grads
        return self.num_grads[max(k for k in self.num_grads if k <= sparsity + 1e-12)]


class LayerwisePruningModifier(_Pruning):
    """Layer-wise pruning (this toolkit's modifier): ``method`` ``sparsegpt``, ``obc`` or
    ``wanda`` prunes every selected linear layer to the target from its calibration inputs (the
    pruning data, read by forward passes only). Per-layer targets by definition.

    ``num_calibration_batches`` batches of the pruning data are read (fewer if it has fewer);
    ``damp`` is the damping of ``H`` as a fraction of its mean diagonal; ``sequential`` calibrates
    each block on the outputs of the pruned blocks before it; ``precision`` (``float64`` or
    ``float32``) is the float type of the calibration products and of SparseGPT's sweep.
    """

    method_name: str = Field("sparsegpt", alias="method")
    num_calibration_batches: int = Field(128, gt=0)
    damp: float = Field(0.01, gt=0)
    sequential: bool = True
    global_sparsity: bool = False
    precision: Literal["float64", "float32"] = "float64"

    @field_validator("method_name")
    @classmethod
    def _method(cls, v):
        return _registered_method(v, "layerwise")

    @field_validator("global_sparsity")
    @classmethod
    def _per_layer(cls, v):
        if v:
            raise ValueError(
                "layer-wise methods prune every layer to the target; global_sparsity must be false"
            )
        return v

    PART_FIELDS: ClassVar[dict[str, str]] = {
        "batches": "num_calibration_batches",
        "rel_damp": "damp",
        "sequential": "sequential",
        "precision": "precision",
    }


class StructureModifier(Modifier):
    """Removes whole attention heads and feed-forward neurons (this toolkit's modifier): the
    matrices shrink and the rest of the recipe (unstructured pruning, distillation, fine-tuning)
    runs on the smaller model. With ``end_epoch`` -1 (the default) they go once, before any
    training (``start_epoch`` 0); with ``end_epoch`` after ``start_epoch`` they go gradually
    during training: at every ``update_frequency`` epochs from ``start_epoch`` to ``end_epoch``,
    each block has removed ``p(t) * target`` of its structures, ``p`` rising from 0 to 1 as
    ``inter_func`` (cubic: most go early, as the unstructured schedules), each step chosen and
    corrected by ``method`` on calibration batches of the model as trained so far; the optimizer
    keeps the moments of what remains. A ``speedup`` is planned once, on the model at the start.

    The sizes are either fractions removed in every block (``heads``, ``neurons``) or a measured
    ``speedup``: a latency table of the model at each size is measured on this machine on a batch of
    ``latency_batch_size`` x the job's ``--max-length`` tokens, and the sizes of least second-order
    error predicted to run ``speedup`` times faster are chosen. ``method``: ``obs`` (greedy
    structured OBS with the OBS correction), ``fisher`` (greedy structured OBS on the empirical
    Fisher of ``num_grads`` calibration gradients, with its correction), ``taylor`` (first-order
    ``sum |w g|``), ``magnitude``, ``activation`` or ``fluctuation``; ``damp`` (a fraction of the
    curvature's mean diagonal) is the two OBS parts' setting, ``bias`` the ``obs`` part's.
    ``uniform: false`` (with ``speedup``) lets the plan keep different sizes in different blocks
    (saved models then load through ``load_structured``, not plain ``transformers``).
    ``layers`` whole blocks go first, then the whole attention (``attention_modules``) and
    feed-forward (``feed_forward_modules``) modules of that many blocks, then the heads and
    neurons of what is left.
    """

    heads: float = Field(0.0, ge=0, lt=1)
    neurons: float = Field(0.0, ge=0, lt=1)
    speedup: float | None = Field(None, gt=1)
    method_name: str = Field("obs", alias="method")
    num_calibration_batches: int = Field(128, gt=0)
    damp: float = Field(0.01, gt=0)
    bias: bool = True
    num_grads: int | None = Field(None, gt=0)
    #: with ``speedup``: the same sizes in every block (loadable in plain ``transformers``), or
    #: (false) sizes chosen per block by their error and measured cost
    uniform: bool = True
    latency_batch_size: int = Field(16, gt=0)
    #: whole blocks removed first (before heads and neurons), chosen by ``layer_method``:
    #: ``loss`` (greedy on the calibration loss with each candidate bypassed) or ``angular``
    layers: int = Field(0, ge=0)
    layer_method: Literal["loss", "angular"] = "loss"
    #: whole attention / feed-forward modules removed inside that many blocks (after whole
    #: blocks, before heads and neurons), chosen greedily by the calibration loss with each
    #: candidate module removed (measured)
    attention_modules: int = Field(0, ge=0)
    feed_forward_modules: int = Field(0, ge=0)
    #: gradual removal (``end_epoch`` after ``start_epoch``): epochs between steps and the curve
    update_frequency: float | None = Field(None, gt=0)
    inter_func: Literal["cubic", "linear", "inverse_cubic"] = "cubic"

    @property
    def gradual(self) -> bool:
        return self.end_epoch > self.start_epoch

    def progress(self) -> list[tuple[float, float]]:
        """``(epoch, share of the target removed by then)`` at every step of a gradual removal;
        one step ``(0, 1)`` when the structures go at once."""
        if not self.gradual:
            return [(0.0, 1.0)]
        span = self.end_epoch - self.start_epoch
        points = pruning_points(
            start_epoch=self.start_epoch,
            end_epoch=self.end_epoch,
            update_frequency=self.update_frequency,
        )
        return [(e, interpolate((e - self.start_epoch) / span, self.inter_func)) for e in points]

    @field_validator("method_name")
    @classmethod
    def _method(cls, v):
        from curvature.pruning.structured import CHOOSERS

        checks.one_of("method", v, sorted(CHOOSERS))
        return v

    @model_validator(mode="after")
    def _target(self):
        if not self.gradual and (self.start_epoch != 0 or self.end_epoch not in (-1, 0)):
            raise ValueError(
                "structures removed at once go before training: start_epoch must be 0 and "
                "end_epoch -1 (or give an end_epoch after start_epoch and an update_frequency "
                "to remove them gradually)"
            )
        if self.gradual and self.update_frequency is None:
            raise ValueError(
                "a gradual removal (end_epoch after start_epoch) needs update_frequency, the "
                "epochs between steps"
            )
        if not self.gradual and (self.update_frequency is not None or self.inter_func != "cubic"):
            raise ValueError(
                "update_frequency and inter_func set a gradual removal, and this one happens "
                "at once (end_epoch -1): remove them or give an end_epoch after start_epoch"
            )
        sized = bool(self.heads or self.neurons)
        whole = self.whole()
        if sized == (self.speedup is not None) and not (whole and not sized):
            raise ValueError(
                "give either heads/neurons (fractions removed per block) or speedup, not "
                + ("both" if sized else "neither")
                + ("" if sized else " (or layers, attention_modules, feed_forward_modules)")
            )
        for name in [k for k, v in whole.items()]:
            if self.speedup is not None or self.gradual:
                what = "whole blocks" if name == "layers" else "whole modules"
                raise ValueError(
                    f"{name} ({what}) are removed once, before training, with fixed "
                    "heads/neurons fractions: remove speedup"
                    if self.speedup is not None
                    else f"{name} ({what}) are removed once, before training: end_epoch -1"
                )
        if self.layer_method != "loss" and not self.layers:
            raise ValueError("layer_method chooses whole blocks, and layers is 0: remove it")
        # damp also prices the sizes of a speed-up plan (its error curves are structured OBS's)
        if self.method_name != "obs" and not self.bias:
            raise ValueError(
                f"method {self.method_name} has no bias setting; the recipe's value would be "
                "ignored: remove it or use method obs"
            )
        damped = self.method_name in ("obs", "fisher") or self.speedup is not None
        if not damped and self.damp != 0.01:
            raise ValueError(
                f"method {self.method_name} has no damp setting; the recipe's value would be "
                "ignored: remove it or use method obs or fisher"
            )
        if not self.uniform and self.speedup is None:
            raise ValueError(
                "uniform: false lets a speed-up plan choose sizes per block; heads/neurons are "
                "fractions removed in every block: give speedup, or remove uniform"
            )
        if self.num_grads is not None and self.method_name != "fisher":
            raise ValueError(
                f"method {self.method_name} takes no gradients; num_grads would be ignored: "
                "remove it or use method fisher"
            )
        return self

    def chooser(self):
        """The structured chooser part this modifier runs."""
        from curvature.pruning import structured

        if self.method_name == "obs":
            return structured.StructuredOBS(
                batches=self.num_calibration_batches, rel_damp=self.damp, bias=self.bias
            )
        if self.method_name == "fisher":
            extra = {} if self.num_grads is None else {"gradients": self.num_grads}
            return structured.FisherOBS(
                batches=self.num_calibration_batches, rel_damp=self.damp, **extra
            )
        return structured.CHOOSERS[self.method_name](batches=self.num_calibration_batches)

    def targets(self) -> dict[str, float]:
        return {k: v for k, v in (("heads", self.heads), ("neurons", self.neurons)) if v}

    def whole(self) -> dict[str, int]:
        """The counts of whole blocks and whole modules removed, where set."""
        counts = {"layers": self.layers, "attention_modules": self.attention_modules,
                  "feed_forward_modules": self.feed_forward_modules}  # fmt: skip
        return {k: v for k, v in counts.items() if v}


class GPTQModifier(Modifier):
    """Post-training quantization of the linear layers (this toolkit's modifier), once, after
    everything else in the recipe (training, pruning): ``method`` ``gptq`` (second-order, on each
    layer's calibration inputs) or ``rtn`` (round to nearest), ``bits`` (2, 3, 4, 8), ``group_size``
    input columns per scale (``null``: per output channel), ``symmetric``; GPTQ's ``actorder``,
    ``static_groups``, ``damp`` (a fraction of ``H``'s mean diagonal), ``block_size`` and
    ``num_calibration_batches``. Zeros of earlier pruning stay zero. ``params``: the weights to
    quantize (default every linear layer's; patterns with ``re:``). ``embedding_bits``: also round
    the input embedding table, one scale per token (its Hessian is diagonal: nearest is optimal).
    ``sparsity`` / ``mask_type`` (``unstructured`` or ``N:M``): prune in the same GPTQ sweep (one
    sweep chooses the mask and rounds the kept weights).
    """

    params: list[str] | str = "__ALL_LINEAR__"
    method: str = "gptq"
    bits: int = 4
    group_size: int | None = Field(128, gt=0)
    symmetric: bool = False
    actorder: bool = False
    static_groups: bool = False
    damp: float = Field(0.01, gt=0)
    block_size: int = Field(128, gt=0)
    num_calibration_batches: int = Field(128, gt=0)
    embedding_bits: int | None = None
    sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    mask_type: str = "unstructured"
    precision: Literal["float64", "float32"] = "float64"

    @model_validator(mode="after")
    def _part(self):
        if self.start_epoch not in (0, -1) or self.end_epoch != -1:
            raise ValueError(
                "quantization runs once, after the rest of the recipe: leave start_epoch and "
                "end_epoch out (gradual quantization-aware training is not supported)"
            )
        self.part()  # the part checks its own settings (one line)
        from curvature.pruning.masks import parse_mask

        structure = parse_mask(self.mask_type)
        joint = self.sparsity > 0 or structure.nm is not None
        if joint and self.method != "gptq":
            raise ValueError("pruning in the quantization sweep (sparsity, N:M) needs method gptq")
        if structure.name == "block4":
            raise ValueError("mask_type block4 cannot be chosen in the quantization sweep; use N:M")
        if joint and self.actorder:
            raise ValueError("actorder reorders columns; it cannot prune in the same sweep")
        return self

    @field_validator("params")
    @classmethod
    def _params(cls, v):
        return [v] if isinstance(v, str) else v

    def weights(self, model) -> list:
        """``[(name, parameter)]`` of the weights it quantizes: by default every linear layer's
        (an output head tied to the input embeddings stays in full precision)."""
        from curvature.pruning import select_params
        from curvature.pruning.quantization import linear_weights

        if self.params in ("__ALL_LINEAR__", ["__ALL_LINEAR__"]):
            return linear_weights(model)
        # a layer of a module removed whole has no weights left to quantize
        return [(n, p) for n, p in select_params(model, self.params) if p.numel()]

    def part(self):
        """The :class:`~curvature.pruning.quantization.Quantize` part this modifier runs."""
        from curvature.pruning.quantization import Quantize

        return Quantize(
            bits=self.bits, group=self.group_size, symmetric=self.symmetric, method=self.method,
            act_order=self.actorder, static_groups=self.static_groups, rel_damp=self.damp,
            block=self.block_size, batches=self.num_calibration_batches,
            embedding_bits=self.embedding_bits, precision=self.precision,
        )  # fmt: skip


class SetLearningRateModifier(Modifier):
    """Set the learning rate from ``start_epoch`` on (a learning-rate function active at the same
    epoch takes precedence)."""

    learning_rate: float = Field(..., ge=0)
    constant_logging: bool | None = None
    log_types: Any = None


class SetWeightDecayModifier(Modifier):
    """Set the optimizer's weight decay at ``start_epoch`` (all parameter groups, or those listed)."""

    weight_decay: float = Field(..., ge=0)
    param_groups: list[int] | None = None
    constant_logging: bool | None = None
    log_types: Any = None


class ConstantPruningModifier(Modifier):
    params: list[str] | str = "__ALL_PRUNABLE__"
    log_types: Any = None

    @field_validator("params")
    @classmethod
    def _params(cls, v):
        return [v] if isinstance(v, str) else v


class LearningRateFunctionModifier(Modifier):
    lr_func: Literal["linear", "cyclic_linear"] = "linear"
    init_lr: float = Field(..., ge=0)
    final_lr: float = Field(0.0, ge=0)
    cycle_epochs: float = Field(1.0, gt=0)
    update_frequency: float = -1.0  # -1: the rate changes at every step
    param_groups: list[int] | None = None  # None: every parameter group

    @field_validator("update_frequency")
    @classmethod
    def _frequency(cls, v):
        if v != -1 and not v > 0:
            raise ValueError("update_frequency must be -1 (every step) or > 0 epochs")
        return v


class DistillationModifier(Modifier):
    hardness: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)
    distill_output_keys: list[str] = Field(default_factory=lambda: ["logits"])
    teacher: str | None = None  # model path; the CLI's --teacher overrides it


#: keywords recipes written for earlier versions use, and the optimizers' names for them
OPTIMIZER_RECIPE_NAMES = {"num_grads": "gradients", "damp": "damping"}


class OptimizerModifier(Modifier):
    """Chooses the optimizer (the recipe hook for the second-order optimizers). ``kwargs`` are
    the optimizer's keywords; ``num_grads`` and ``damp`` are read as ``gradients`` and
    ``damping``."""

    name: str = "adamw"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self):
        from curvature.optim import check_optimizer

        renamed = {OPTIMIZER_RECIPE_NAMES.get(k, k): v for k, v in self.kwargs.items()}
        if len(renamed) != len(self.kwargs):
            raise ValueError("kwargs: num_grads/damp and gradients/damping name one setting twice")
        self.kwargs = check_optimizer(self.name, renamed)
        return self


MODIFIERS: dict[str, type[Modifier]] = {
    cls.__name__: cls
    for cls in (
        EpochRangeModifier,
        OBSPruningModifier,
        MagnitudePruningModifier,
        GlobalMagnitudePruningModifier,
        ConstantPruningModifier,
        LearningRateFunctionModifier,
        DistillationModifier,
        OptimizerModifier,
        MFACPruningModifier,
        LayerwisePruningModifier,
        GMPruningModifier,
        SetLearningRateModifier,
        SetWeightDecayModifier,
        StructureModifier,
        GPTQModifier,
    )
}

#: modifiers of the recipe format that this toolkit does not implement, and what they do
UNSUPPORTED: dict[str, str] = {
    "QuantizationModifier": "quantization-aware training",
    "LegacyQuantizationModifier": "quantization-aware training",
    "ACDCPruningModifier": "alternating compressed/decompressed training",
    "MovementPruningModifier": "movement pruning",
    "LayerPruningModifier": "removing whole layers",
    "StructuredPruningModifier": "channel/filter pruning (heads and neurons: !StructureModifier)",
    "LayerThinningModifier": "layer thinning",
    "TrainableParamsModifier": "freezing parameters",
    "SetParamModifier": "setting parameter values",
    "GradualParamModifier": "interpolating parameter values",
    "LegacyGMPruningModifier": "the legacy gradual magnitude schedule",
    "TopKASTPruningModifier": "top-KAST pruning",
    "MagnitudePruningModifierLegacy": "the legacy magnitude modifier",
}
