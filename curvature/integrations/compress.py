"""Compressed sparse checkpoints: a bitmask plus the non-zero values, in safetensors.

A pruned model saved with ``save_pretrained`` is as large as the dense one: zeros take the same
bytes. ``save_compressed`` stores every tensor that is sparse enough as ``<name>::mask`` (one bit
per weight, packed) and ``<name>::values`` (the non-zeros in order); the rest stays dense. The
folder also holds the model config, so ``load_compressed`` rebuilds a plain ``transformers``
model with exactly the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FILENAME = "model.sparse.safetensors"
# Below this fraction of zeros a bitmask (1 bit per weight) does not pay for itself.
MIN_SPARSITY = 1.0 / 32.0 + 0.02


def compress_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    out, meta = {}, {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        zeros = (t == 0).float().mean().item() if t.numel() else 0.0
        if t.is_floating_point() and t.numel() >= 64 and zeros >= MIN_SPARSITY:
            mask = (t != 0).flatten()
            bits = np.packbits(mask.numpy().astype(np.uint8))
            out[f"{name}::mask"] = torch.from_numpy(bits)
            out[f"{name}::values"] = t.flatten()[mask].clone()
            meta[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            out[name] = t
    return out, meta


def decompress_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in tensors.items() if "::" not in k}
    for name, info in meta.items():
        numel = int(np.prod(info["shape"])) if info["shape"] else 1
        bits = np.unpackbits(tensors[f"{name}::mask"].numpy())[:numel].astype(bool)
        values = tensors[f"{name}::values"]
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[torch.from_numpy(bits)] = values
        state[name] = dense.view(info["shape"])
    return state


def save_compressed(model, folder: str | Path) -> dict:
    """Write config and compressed weights to ``folder``; returns dense and compressed sizes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "config"):
        model.config.save_pretrained(folder)
    state = model.state_dict()
    # tied weights appear under several names; store each storage once
    seen, unique = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        unique[name] = t
    tensors, meta = compress_state(unique)
    save_file(tensors, str(folder / FILENAME), metadata={"sparse": json.dumps(meta)})
    # the same weights as a plain dense safetensors file, for an honest on-disk comparison
    dense_path = folder / ".dense-size.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in unique.items()}, str(dense_path))
    dense_bytes = dense_path.stat().st_size
    dense_path.unlink()
    return {"dense_bytes": dense_bytes, "compressed_bytes": (folder / FILENAME).stat().st_size}


def load_compressed(folder: str | Path, model_cls=None):
    """Rebuild the model saved by :func:`save_compressed` (a plain ``transformers`` model)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(folder)
    path = folder / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a folder written by save_compressed")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["sparse"])
    state = decompress_state(load_file(str(path)), meta)
    config = AutoConfig.from_pretrained(folder)
    if model_cls is None:  # the head the config was saved with (a classifier if it names none)
        import transformers

        archs = [getattr(transformers, a, None) for a in config.architectures or []]
        model_cls = next((a for a in archs if a is not None), AutoModelForSequenceClassification)
    model = (
        model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"compressed checkpoint does not match the config: missing {missing}, unexpected {unexpected}"
        )
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


METADATA = "sparsity.json"


def write_sparsity_metadata(folder: str | Path, metrics: dict, protocol: dict) -> dict:
    """This toolkit's sparsity file beside a ``save_pretrained`` checkpoint (dense with zeros).

    It says what made the zeros: the methods and masks of the pruning steps, the sparsity of every
    pruned parameter, and the protocol (task, data, sequence length, seed, calibration). The
    config is left alone: no ``sparsity_config`` is written into ``config.json`` (current serving
    engines reject a non-empty one, and the zeros load everywhere as ordinary weights).
    """
    steps = metrics.get("pruning_steps") or []
    meta = {
        "format": "curvature-sparsity/1",
        "weights": "dense safetensors with the pruned weights exactly zero",
        "methods": sorted({s["method"] for s in steps if "method" in s}),
        "masks": sorted({s["mask"] for s in steps if "mask" in s}),
        "sparsity": metrics.get("sparsity"),
        "param_sparsity": metrics.get("param_sparsity", {}),
        "steps": [
            {k: s.get(k) for k in ("epoch", "method", "mask", "selection", "target_sparsity")}
            for s in steps
        ],
        "protocol": protocol,
    }
    Path(folder, METADATA).write_text(json.dumps(meta, indent=2))
    return meta
