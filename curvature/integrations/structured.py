"""Saving and loading models whose heads and neurons were removed (physically smaller matrices).

:func:`save_structured` writes a plain ``save_pretrained`` folder. The configuration is updated
where it can say the new sizes (``intermediate_size`` / ``ffn_dim`` for the feed-forward;
``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` for attention where the
architecture reads ``head_dim`` from its configuration, as Llama does), and that is *checked*: the
model the updated configuration builds (on the meta device) must have exactly the saved tensors'
shapes. When it does, ``AutoModel...from_pretrained(folder)`` loads the model in plain
``transformers`` (``plain_transformers: true`` in ``structured.json``). When the sizes cannot be said
by the configuration (BERT's head size is ``hidden_size / num_attention_heads``, so fewer heads
of the same size cannot be written; sizes that differ from block to block), the configuration keeps
the sizes it can say and :func:`load_structured` builds the model from it and resizes every linear
layer to its saved shape before loading the weights (the attention of these architectures
reshapes by ``-1`` heads, so a smaller projection runs as is).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from curvature.pruning import structures

STRUCTURED = "structured.json"
_NEURON_FIELDS = ("intermediate_size", "ffn_dim")


def _uniform(values):
    return values[0] if values and all(v == values[0] for v in values) else None


def _config_updates(config, groups) -> dict:
    heads = [g for g in groups if g.kind == "heads"]
    neurons = [g for g in groups if g.kind == "neurons"]
    out = {}
    n = _uniform([g.count for g in neurons])
    if n is not None:
        for f in _NEURON_FIELDS:
            if hasattr(config, f):
                out[f] = n
    kv = _uniform([g.count for g in heads])
    if kv is not None and heads:
        g = heads[0]
        per_kv = g.width // g.narrow  # query heads per key/value head
        out["num_attention_heads"] = kv * per_kv
        if hasattr(config, "num_key_value_heads"):
            out["num_key_value_heads"] = kv
        out["head_dim"] = g.narrow
    return out


def _shapes_match(model, config) -> bool:
    with torch.device("meta"):
        try:
            fresh = type(model)(config)
        except Exception:  # noqa: BLE001 - a configuration the architecture refuses: not plain
            return False
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return all(got.get(k) == s for k, s in want.items())


def save_structured(
    model, groups, folder, tokenizer=None, extra: dict | None = None, state_dict=None
) -> dict:
    """Save ``model`` (pruned by :func:`curvature.pruning.structured.run`, whose report's ``groups``
    are ``groups``) to ``folder``; returns what ``structured.json`` says. ``state_dict``: the
    tensors to write instead of the model's (its quantized layers packed)."""
    import copy

    folder = Path(folder)
    config = copy.deepcopy(model.config)
    updates = _config_updates(config, groups)
    heads_fields = ("num_attention_heads", "num_key_value_heads", "head_dim")
    trial = copy.deepcopy(config)
    for k, v in updates.items():
        setattr(trial, k, v)
    # a block whose attention was replaced whole (``extra["modules"]``) has no configuration
    plain = _shapes_match(model, trial) and not (extra or {}).get("modules")
    if not plain:  # keep the feed-forward size if that alone is expressible
        trial = copy.deepcopy(config)
        for k, v in updates.items():
            if k not in heads_fields:
                setattr(trial, k, v)
    sizes = structures.sizes(groups)
    names = {id(m): n for n, m in model.named_modules()}
    attention = {
        names[id(g.owner)]: list(g.head_counts())
        for g in groups
        if g.kind == "heads" and g.owner is not None and id(g.owner) in names
    }
    info = {
        "plain_transformers": plain,
        "sizes": sizes,
        "attention": attention,
        "config_updates": {k: v for k, v in updates.items() if getattr(trial, k, None) == v},
        **(extra or {}),
    }
    original = model.config
    model.config = trial
    try:
        model.save_pretrained(folder, state_dict=state_dict)
    finally:
        model.config = original
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / STRUCTURED).write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_structured(folder, model_cls=None):
    """The model saved by :func:`save_structured`, its linear layers at their saved shapes."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise FileNotFoundError(f"{folder}: no config.json and safetensors weights to load")
    config = AutoConfig.from_pretrained(folder)
    if model_cls is None:
        import transformers

        archs = [getattr(transformers, a, None) for a in config.architectures or []]
        model_cls = next((a for a in archs if a is not None), AutoModelForSequenceClassification)
    model = (
        model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    )
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    quantized = getattr(config, "quantization_config", None)
    if quantized:  # saved packed: read the integer weights back to float first
        from curvature.integrations.packed import unpacked

        state = unpacked(state, quantized if isinstance(quantized, dict) else quantized.to_dict())
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = state.get(f"{name}.weight")
        if w is None or tuple(w.shape) == tuple(mod.weight.shape):
            continue
        mod.out_features, mod.in_features = int(w.shape[0]), int(w.shape[1])
        mod.weight = torch.nn.Parameter(torch.empty_like(w))
        if mod.bias is not None:
            mod.bias = torch.nn.Parameter(torch.empty(w.shape[0], dtype=mod.bias.dtype))
    from curvature.pruning.structures import Silent, set_head_counts

    meta = json.loads((folder / STRUCTURED).read_text()) if (folder / STRUCTURED).is_file() else {}
    for name, (heads, kv) in meta.get("attention", {}).items():
        set_head_counts(model.get_submodule(name), heads, kv)
    for name, spec in meta.get("modules", {}).items():  # whole attention modules removed
        spec = dict(spec)
        silent = Silent(spec.pop("width"), spec.pop("outputs"), **spec)
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, silent)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{folder}: the weights do not match the configuration: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return model.eval()
