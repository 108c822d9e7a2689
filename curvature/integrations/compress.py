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
    model = (model_cls or AutoModelForSequenceClassification).from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"compressed checkpoint does not match the config: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()
