"""Tasks: the models and data a job works on (offline packages, local folders and files).

The entry points for scripts:

- :func:`load_task` (``"bbc-news"``, ``"tweet-sentiment"``, a ``.csv`` / ``.jsonl`` file, or a
  hub name when online) returns a :class:`TaskData` with seeded train/validation splits;
- :func:`load_classifier` (``"default"`` is the embedded MiniLM) returns ``(model, tokenizer)``;
- :func:`make_batches` turns a split into the list of dict batches that
  :func:`curvature.pruning.prune` and ``model(**batch)`` take;
- :func:`evaluate` measures accuracy and loss over such batches;
- :func:`default_model_path` is the embedded MiniLM's folder;
- :func:`prepare` loads any task of :mod:`curvature.tasks.kinds` (sequence classification,
  question answering, masked and causal LM): model, tokenizer, training features, collator and
  evaluator, as ``curvature prune``, ``sweep`` and ``train`` use them.
"""

from curvature.tasks.api import evaluate, make_batches
from curvature.tasks.data import DataError, TaskData, load_task, tokenize
from curvature.tasks.kinds import TASKS, Prepared, infer_task, load_model, prepare
from curvature.tasks.models import ModelNotFoundError, default_model_path, load_classifier

__all__ = [
    "DataError",
    "ModelNotFoundError",
    "Prepared",
    "TASKS",
    "TaskData",
    "default_model_path",
    "evaluate",
    "infer_task",
    "load_classifier",
    "load_task",
    "load_model",
    "make_batches",
    "prepare",
    "tokenize",
]
