"""The documented entry points for scripts: load the embedded model and data, make ``batches``
for :func:`curvature.pruning.prune`, and measure accuracy.

Example (about 20 s on a 2-core CPU: loads MiniLM and 64 + 64 BBC articles):

    >>> from curvature.tasks import evaluate, load_classifier, load_task, make_batches
    >>> task = load_task("bbc-news", max_train=64, max_validation=64)
    >>> model, tokenizer = load_classifier("default", task.num_labels, task.label_names)
    >>> batches = make_batches(task, tokenizer, batch_size=8, max_length=64)
    >>> len(batches), sorted(batches[0])
    (8, ['attention_mask', 'input_ids', 'labels', 'token_type_ids'])
    >>> 0.0 <= evaluate(model, make_batches(task, tokenizer, split="validation"))["accuracy"] <= 1.0
    True
"""

from __future__ import annotations

import torch

from curvature.tasks.data import TaskData, tokenize


def make_batches(
    task: TaskData,
    tokenizer,
    *,
    split: str = "train",
    batch_size: int = 8,
    max_length: int = 128,
    max_examples: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``split`` of ``task`` and return padded batches in order: a list of dicts of
    tensors (``input_ids``, ``attention_mask``, ..., ``labels``), what ``model(**batch)`` takes
    and what :func:`curvature.pruning.prune` iterates for its Fisher gradients (one gradient per
    batch)."""
    from transformers import DataCollatorWithPadding

    if split not in task.dataset:
        raise ValueError(f"split must be one of {sorted(task.dataset)}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    enc = tokenize(task, tokenizer, max_length=max_length)[split]
    if max_examples is not None:
        enc = enc.select(range(min(max_examples, len(enc))))
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    rows = [enc[i] for i in range(len(enc))]
    return [dict(collate(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]


def evaluate(model: torch.nn.Module, batches) -> dict[str, float]:
    """Accuracy and mean loss of a sequence classifier over ``batches`` (dicts with ``labels``),
    in evaluation mode; the model's training mode is restored afterwards."""
    from curvature.tasks.kinds import classification_eval

    ev = classification_eval(model, batches)
    return {"accuracy": ev["accuracy"], "loss": ev["loss"]}
