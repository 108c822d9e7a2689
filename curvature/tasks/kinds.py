"""The task layer: what a job trains, prunes and measures, chosen by ``--task``.

A task knows how to load and preprocess its data, which ``AutoModelFor...`` head to build, the
loss its batches give (``model(**batch).loss``, what the Fisher gradients and training use), its
evaluation metric, and which outputs distillation reads. :func:`prepare` returns all of that as
one :class:`Prepared`; ``curvature prune``, ``sweep`` and ``train`` use nothing else.

==========================  =============================  ===========================  ==================
task                        head                           metric (``metrics.json``)    distillation keys
==========================  =============================  ===========================  ==================
``sequence-classification`` ``AutoModelForSequenceClass.`` ``accuracy`` (+ ``f1``, 2     ``logits``
                                                           labels), ``loss``
``question-answering``      ``AutoModelForQuestionAnsw.``  ``exact_match``, ``f1``       ``start_logits``,
                                                           (SQuAD, percent)             ``end_logits``
``masked-lm``               ``AutoModelForMaskedLM``       ``perplexity``, ``loss``      ``logits``
``causal-lm``               ``AutoModelForCausalLM``       ``perplexity``, ``loss``      ``logits``
==========================  =============================  ===========================  ==================

Without ``--task`` the task is inferred from the data's columns and the model's config
(:func:`infer_task`); an ambiguous case is an error that lists the choices.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from curvature.tasks.data import DataError

TASKS = ("sequence-classification", "question-answering", "masked-lm", "causal-lm")
# the metric each task is judged by, and whether higher is better
PRIMARY = {
    "sequence-classification": ("accuracy", True),
    "question-answering": ("f1", True),
    "masked-lm": ("perplexity", False),
    "causal-lm": ("perplexity", False),
}
DISTILL_KEYS = {
    "sequence-classification": ("logits",),
    "question-answering": ("start_logits", "end_logits"),
    "masked-lm": ("logits",),
    "causal-lm": ("logits",),
}
_HEADS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
}
_DECODER_TYPES = {
    "gpt2", "opt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt_neox", "gptj", "phi",
    "phi3", "gemma", "gemma2", "gemma3", "falcon", "bloom", "smollm3", "olmo", "olmo2",
}  # fmt: skip


@dataclass
class Prepared:
    """A task ready to run: model, tokenizer, training features, collator and evaluator.

    ``evaluate(model, progress=False, desc="eval")`` returns the task's metrics (a dict with
    ``metric`` among its keys); ``train`` holds model inputs with their labels.
    """

    task: str
    model: torch.nn.Module
    tokenizer: object
    train: object  # datasets.Dataset of model inputs
    collator: Callable
    evaluate: Callable[..., dict]
    info: dict = field(default_factory=dict)
    label_names: list[str] | None = None
    #: the text of each evaluation unit, by its ``id`` (examples, questions, documents), so a
    #: report can show what a pruned model got wrong; None where units have no single text
    texts: list[str] | None = None

    @property
    def metric(self) -> str:
        return PRIMARY[self.task][0]

    @property
    def higher_is_better(self) -> bool:
        return PRIMARY[self.task][1]

    @property
    def distill_keys(self) -> tuple[str, ...]:
        return DISTILL_KEYS[self.task]


def check_task(task: str | None) -> str | None:
    """``None`` or a known task name; otherwise one clear error with the nearest name."""
    if task is None or task in TASKS:
        return task
    near = difflib.get_close_matches(str(task), TASKS, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise DataError(f"--task: unknown task {task!r}{hint}; choose from {', '.join(TASKS)}")


# ------------------------------------------------------------------------------------ inference


def _data_kind(data: str) -> str | None:
    """'classification', 'qa', 'text' or None (unknown) from the data's name or columns."""
    if data in ("bbc-news", "tweet-sentiment"):
        return "classification"
    path = Path(data)
    if not path.is_file():  # a hub name: SQuAD's, or a labelled dataset
        return "qa" if "squad" in data.lower() else "classification"
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "text"
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as fh:
                columns = set(next(csv.reader(fh), []))
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                columns = set(json.loads(fh.readline()))
        elif suffix == ".json":
            obj = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(obj, dict) and "data" in obj:
                return "qa"
            columns = set(obj[0]) if isinstance(obj, list) and obj else set()
        else:
            return None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if {"question", "context"} <= columns:
        return "qa"
    if "label" in columns:
        return "classification"
    if "text" in columns:
        return "text"
    return None


def _model_kind(model: str) -> str | None:
    """'decoder', 'encoder', or a task name fixed by the model's head, from its config."""
    from curvature.tasks.models import resolve_model_path

    if str(model) == "smollm2" or str(model).endswith(".gguf"):
        return "causal-lm"  # the GGUF files this loads are decoder language models
    try:
        folder = Path(resolve_model_path(model))
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, OSError):
        return None
    for arch in config.get("architectures") or []:
        if arch.endswith("ForQuestionAnswering"):
            return "question-answering"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith(("ForMaskedLM", "ForPreTraining")):
            return "masked-lm"
    if config.get("is_decoder") or config.get("model_type") in _DECODER_TYPES:
        return "decoder"
    return "encoder"


def infer_task(model: str, data: str) -> str:
    """The task for ``model`` and ``data`` when unambiguous: question/context columns mean
    question answering; a label column (or a built-in labelled dataset) sequence classification;
    text alone a language model, masked for an encoder and causal for a decoder."""
    data = str(data)
    looks_like_file = data.lower().endswith((".csv", ".json", ".jsonl", ".txt"))
    if (looks_like_file or data.startswith((".", "/", "~"))) and not Path(data).exists():
        raise DataError(f"data file {data} does not exist")
    from curvature.tasks.models import resolve_model_path

    resolve_model_path(model)  # a model that cannot be found is named as such
    kind = _data_kind(data)
    if kind == "qa":
        return "question-answering"
    if kind == "classification":
        return "sequence-classification"
    mk = _model_kind(str(model))
    if kind == "text":
        if mk in ("decoder", "causal-lm"):
            return "causal-lm"
        if mk in ("encoder", "masked-lm"):
            return "masked-lm"
    raise DataError(
        f"cannot tell the task from data {data!r} and model {model!r}: pass --task with one of "
        f"{', '.join(TASKS)}"
    )


# ---------------------------------------------------------------------------------------- models


def fit_length(net, max_length: int) -> int:
    """``max_length``, or the model's number of positions with one warning line when it holds
    fewer tokens (as a tokenizer truncates): a longer input would fail inside the model."""
    cfg = net.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit and getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= (cfg.pad_token_id or 0) + 1  # positions start after the padding index
    if limit and max_length > limit:
        warnings.warn(
            f"--max-length {max_length} is longer than the model's {limit} positions: using "
            f"{limit} tokens per example",
            stacklevel=2,
        )
        return int(limit)
    return max_length


def load_model(task: str, name_or_path, **kwargs):
    """The task's head on a model folder or hub name (eager attention, which keeps double
    backward available for the curvature optimizers)."""
    import transformers

    from curvature.tasks.models import model_source

    head = getattr(transformers, _HEADS[check_task(task)])
    path, extra = model_source(name_or_path)
    model = head.from_pretrained(path, attn_implementation="eager", **extra, **kwargs)
    if "gguf_file" in extra:
        # the GGUF weights were dequantized to float32 while loading: the model is a plain
        # float32 model, saved as such (left marked as quantized, it refuses save_pretrained)
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _tokenizer(name_or_path):
    from transformers import AutoTokenizer

    from curvature.tasks.models import model_source

    path, extra = model_source(name_or_path)
    extra.pop("dtype", None)
    tok = AutoTokenizer.from_pretrained(path, **extra)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # decoders often have none; padding is masked anyway
    return tok


# ------------------------------------------------------------------------------------- prepare


def prepare(
    task: str | None,
    model: str,
    data: str,
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    max_length: int = 128,
    eval_batch_size: int = 64,
    doc_stride: int | None = None,
    stride: int | None = None,
    validation_fraction: float = 0.2,
    eval_split: str | None = None,
    eval_data: str | None = None,
) -> Prepared:
    """Load ``data`` and ``model`` for ``task`` (``None``: :func:`infer_task`).

    ``max_train`` / ``max_eval`` count examples (classification, question answering: questions)
    or documents (language models). ``doc_stride`` is the question-answering window overlap (default a third
    of ``max_length``, at most 128: the usual 128 of 384);
    ``stride`` the causal-LM evaluation stride (default ``max_length // 2``). ``eval_data`` is a
    separate validation file (an official dev set); then all of ``data`` trains.
    """
    if eval_data is not None and eval_split is not None:
        raise DataError("--eval-data and --eval-split both choose the validation data: pass one")
    data = os.path.expanduser(str(data))
    eval_data = os.path.expanduser(str(eval_data)) if eval_data is not None else None
    task = check_task(task) or infer_task(model, data)
    # a setting the chosen task does not read is refused, never ignored
    if doc_stride is not None and task != "question-answering":
        raise DataError(f"--doc-stride applies to question-answering, not to {task}")
    if stride is not None and task != "causal-lm":
        raise DataError(f"--eval-stride applies to causal-lm, not to {task}")
    if eval_split is not None and task != "sequence-classification":
        raise DataError(
            f"--eval-split applies to hub classification data, not to {task} (use --eval-data)"
        )
    sizes = dict(seed=seed, max_train=max_train, max_eval=max_eval, max_length=max_length)
    if task == "sequence-classification":
        return _prepare_classification(
            model, data, **sizes, eval_batch_size=eval_batch_size,
            fraction=validation_fraction, eval_split=eval_split, eval_data=eval_data,
        )  # fmt: skip
    if task == "question-answering":
        return _prepare_qa(
            model, data, **sizes, eval_batch_size=eval_batch_size, stride=doc_stride,
            frac=validation_fraction, eval_data=eval_data,
        )  # fmt: skip
    return _prepare_lm(
        task, model, data, **sizes, bs=eval_batch_size, stride=stride,
        frac=validation_fraction, eval_data=eval_data,
    )  # fmt: skip


@torch.no_grad()
def classification_eval(model, loader, *, progress=False, desc="eval") -> dict:
    """Accuracy, mean loss and (two labels) the F1 of label 1, as GLUE reports MRPC and QQP;
    ``units`` holds each example's label, prediction, confidence (the top class probability),
    loss and correctness, by position in the loader (see :mod:`curvature.tasks.stats`)."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, labels, confs, losses = [], [], [], []
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits.float()
            y = batch["labels"]
            probs = torch.softmax(logits, -1)
            conf, p = probs.max(-1)
            preds.append(p.cpu())
            confs.append(conf.cpu())
            labels.append(y.cpu())
            losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="none").cpu())
    finally:
        model.train(was)
    if not labels:
        raise DataError("evaluation needs at least one validation example")
    p, y = torch.cat(preds), torch.cat(labels)
    loss = torch.cat(losses).double()
    correct = (p == y).double()
    units = {
        "id": list(range(len(y))),
        "label": y.numpy(),
        "prediction": p.numpy(),
        "confidence": torch.cat(confs).double().numpy(),
        "loss": loss.numpy(),
        "correct": correct.numpy(),
    }
    out = {
        "accuracy": float(correct.mean()),
        "loss": float(loss.mean()),
        "examples": len(y),
        "units": units,
    }
    if getattr(model.config, "num_labels", 0) == 2:
        tp = int(((p == 1) & (y == 1)).sum())
        fp, fn = int(((p == 1) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum())
        out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
        units["f1_num"] = (2 * ((p == 1) & (y == 1))).double().numpy()
        units["f1_den"] = ((p == 1).double() + (y == 1).double()).numpy()
    return out


def _prepare_classification(
    model,
    data,
    *,
    seed,
    max_train,
    max_eval,
    max_length,
    eval_batch_size,
    fraction,
    eval_split,
    eval_data=None,
):
    from transformers import DataCollatorWithPadding

    from curvature.tasks.data import load_task, tokenize

    td = load_task(
        data,
        seed=seed,
        max_train=max_train,
        max_validation=max_eval,
        validation_fraction=fraction,
        validation_split=eval_split,
        validation_file=eval_data,
    )
    names = td.label_names
    net = load_model(
        "sequence-classification",
        model,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    tok = _tokenizer(model)
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tok.pad_token_id
    max_length = fit_length(net, max_length)
    enc = tokenize(td, tok, max_length=max_length)
    collator = DataCollatorWithPadding(tok)
    loader = torch.utils.data.DataLoader(
        enc["validation"], batch_size=eval_batch_size, collate_fn=collator
    )

    def evaluate(m, *, progress=False, desc="eval"):
        return classification_eval(m, loader, progress=progress, desc=desc)

    info = {
        "train_examples": len(enc["train"]),
        "validation_examples": len(enc["validation"]),
        "text_columns": list(td.text_columns),
        **td.info,
    }
    val = td.dataset["validation"]
    texts = [" | ".join(str(val[c][i]) for c in td.text_columns) for i in range(len(val))]
    return Prepared(
        "sequence-classification", net, tok, enc["train"], collator, evaluate, info, names, texts
    )


def _load_qa_rows(data, seed, fraction, eval_data=None):
    from curvature.tasks.qa import read_squad_file, split_by_context

    path = Path(data)
    if eval_data is not None:
        for f in (data, eval_data):
            if not Path(f).is_file():
                raise DataError(f"data file {f} does not exist")
        train = read_squad_file(path)
        random.Random(seed).shuffle(train)
        return train, read_squad_file(Path(eval_data)), False
    if path.exists():
        train, val = split_by_context(read_squad_file(path), fraction, seed)
        # seeded order, so --max-train / --max-eval take a sample, not the first articles
        random.Random(seed).shuffle(train)
        random.Random(seed + 1).shuffle(val)
        return train, val, False
    if data.endswith((".json", ".jsonl")) or os.sep in data and data.startswith((".", "/")):
        raise DataError(f"data file {data} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(f"dataset {data!r} is not a local SQuAD file, and hub downloads are off")
    from datasets import load_dataset

    repo, _, config = data.partition(":")
    try:
        ds = load_dataset(repo, config or None)
    except Exception as exc:
        raise DataError(f"dataset {data!r}: loading it from the hub failed: {exc}") from exc
    train = [dict(r) for r in ds["train"].shuffle(seed=seed)]
    val = [dict(r) for r in ds["validation"]]
    return train, val, None


def _prepare_qa(
    model, data, *, seed, max_train, max_eval, max_length, eval_batch_size, stride, frac, eval_data
):
    from datasets import Dataset
    from transformers import default_data_collator

    from curvature.tasks import qa

    train_rows, val_rows, version_2 = _load_qa_rows(str(data), seed, frac, eval_data)
    if max_train is not None:
        train_rows = train_rows[:max_train]
    if max_eval is not None:
        val_rows = val_rows[:max_eval]
    if version_2 is False or version_2 is None:  # v2 when some question has no answer
        version_2 = any(not r["answers"]["text"] for r in train_rows + val_rows)
    net = load_model("question-answering", model)
    max_length = fit_length(net, max_length)
    if stride is None:
        stride = min(128, max_length // 3)
    if not 0 <= stride < max_length:
        raise DataError(f"--doc-stride {stride} must be in [0, --max-length {max_length})")
    tok = _tokenizer(model)
    train_ex, val_ex = Dataset.from_list(train_rows), Dataset.from_list(val_rows)
    train = train_ex.map(
        lambda b: qa.prepare_train_features(b, tok, max_length, stride),
        batched=True,
        remove_columns=train_ex.column_names,
    )
    val_feats = val_ex.map(
        lambda b: qa.prepare_eval_features(b, tok, max_length, stride),
        batched=True,
        remove_columns=val_ex.column_names,
    )
    refs = {r["id"]: list(r["answers"]["text"]) for r in val_rows}

    def evaluate(m, *, progress=False, desc="eval"):
        s, e = qa.predict_logits(
            m, val_feats, default_data_collator, eval_batch_size, progress=progress, desc=desc
        )
        preds = qa.postprocess(val_ex, val_feats, s, e, version_2=version_2)
        return {**qa.squad_metrics(preds, refs), "units": qa.squad_units(preds, refs)}

    info = {
        "train_examples": len(train_rows),
        "train_features": len(train),
        "validation_examples": len(val_rows),
        "validation_features": len(val_feats),
        "squad_version": 2 if version_2 else 1,
        "doc_stride": stride,
    }
    texts = [r["question"] for r in val_rows]
    return Prepared(
        "question-answering", net, tok, train, default_data_collator, evaluate, info, None, texts
    )


def _prepare_lm(
    task, model, data, *, seed, max_train, max_eval, max_length, bs, stride, frac, eval_data
):
    from transformers import DataCollatorForLanguageModeling

    from curvature.tasks import lm

    docs = lm.read_corpus(str(data)) if str(data) == "bbc-news" or Path(data).exists() else None
    if docs is None:
        raise DataError(
            f"data {data!r}: a language-model task reads 'bbc-news', a .txt file (one document "
            "per line) or a .csv/.jsonl/.json file with a 'text' column"
        )
    if eval_data is not None:
        train_docs, val_docs = docs, lm.read_corpus(str(eval_data))
    else:
        train_docs, val_docs = lm.split_documents(docs, frac, seed)
    if max_train is not None:
        train_docs = train_docs[:max_train]
    if max_eval is not None:
        val_docs = val_docs[:max_eval]
    net = load_model(task, model)
    max_length = fit_length(net, max_length)
    tok = _tokenizer(model)
    if task == "masked-lm":
        if tok.mask_token is None:
            raise DataError(f"model {model!r}: its tokenizer has no mask token, so no masked-LM")
        sep, cls = tok.sep_token_id, tok.cls_token_id
        train = lm.block_dataset(
            lm.blocks(
                lm.token_stream(train_docs, tok, separator=sep), max_length, cls=cls, sep=sep
            ),
            labels=False,
        )
        val = lm.block_dataset(
            lm.blocks(lm.token_stream(val_docs, tok, separator=sep), max_length, cls=cls, sep=sep),
            labels=False,
        )
        collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
        if len(val) == 0:
            raise DataError(
                f"data {data!r}: the validation documents fill no {max_length}-token block"
            )
        batches = lm.mask_once(val, collator, batch_size=bs)

        def evaluate(m, *, progress=False, desc="eval"):
            return lm.masked_lm_eval(m, batches, progress=progress, desc=desc)

        extra = {"validation_blocks": len(val), "eval_mask_seed": lm.EVAL_MASK_SEED}
    else:
        from transformers import default_data_collator

        eos = tok.eos_token_id
        # full blocks need no padding: labels are the inputs (the model shifts them), so the
        # end-of-sequence tokens between documents are predicted too (a padding-aware collator
        # would drop them when the pad token is the end-of-sequence token)
        train = lm.block_dataset(
            lm.blocks(lm.token_stream(train_docs, tok, separator=eos), max_length), labels=True
        )
        stream, doc_of = lm.token_stream(val_docs, tok, separator=eos, with_documents=True)
        step = stride or max(max_length // 2, 1)
        if not 1 <= step <= max_length:
            raise DataError(f"--eval-stride {step} must be in [1, --max-length {max_length}]")
        collator = default_data_collator

        def evaluate(m, *, progress=False, desc="eval"):
            return lm.causal_lm_eval(
                m, stream, max_length=max_length, stride=step, progress=progress, desc=desc,
                documents=doc_of,
            )  # fmt: skip

        extra = {"validation_tokens": len(stream), "stride": step}
    if len(train) == 0:
        raise DataError(f"data {data!r}: the training documents fill no {max_length}-token block")
    info = {
        "train_documents": len(train_docs),
        "train_blocks": len(train),
        "validation_documents": len(val_docs),
        "block_length": max_length,
        **extra,
    }
    texts = list(val_docs) if task == "causal-lm" else None  # masked LM: units are blocks
    return Prepared(task, net, tok, train, collator, evaluate, info, None, texts)
