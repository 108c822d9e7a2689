"""Extractive question answering in the SQuAD v1.1 / v2.0 format.

Data
    A local SQuAD file, nested as published (``{"data": [{"paragraphs": [{"context", "qas":
    [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``), or a flat
    ``.jsonl`` / ``.json`` file of rows ``{id, question, context, answers: {text: [...],
    answer_start: [...]}}`` as the hub's ``squad`` dataset stores them; or, when online, a hub name
    (``squad``, ``squad_v2``). An unanswerable question (v2) has no answers.

Preprocessing (the usual long-context scheme)
    Question and context are tokenized together, truncating only the context; a context longer
    than ``max_length`` is cut into overlapping windows (``doc_stride`` tokens shared between
    neighbours), each a separate feature. A training feature is labelled with the token span of
    the first answer when the answer lies wholly inside its window, and with the ``[CLS]`` position
    (no answer) otherwise. An evaluation feature keeps its example id and the character offsets of
    its context tokens.

Post-processing
    For each example, over all its windows: the ``n_best`` largest start and end logits, spans with
    ``start <= end < start + max_answer_length`` inside the context, scored ``start + end``; the
    best span's text is the prediction. With ``version_2`` the prediction is empty when the best
    window's ``[CLS]`` score (``start[0] + end[0]``) is larger than the best span's.

Metric
    The official SQuAD evaluation: answers normalised (lower case, punctuation and the articles
    a/an/the removed, white space collapsed), exact match and token F1 taken as the maximum over
    the ground truths, averaged over questions, in percent. A question with no ground truth (v2)
    scores 1 only for an empty prediction.
"""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

import numpy as np
import torch

from curvature.tasks.data import DataError

# --------------------------------------------------------------------------------------- metric


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces.

    >>> normalize_answer("The  Eiffel Tower!")
    'eiffel tower'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Token F1 of the normalised answers (bag of tokens).

    >>> round(f1_score("the cat sat", "a cat sat down"), 4)  # 2 common / (2 pred, 3 truth)
    0.8
    """
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(truth).split()
    if not pred or not gold:  # an empty answer matches only an empty answer
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """Exact match and F1 in percent, each the maximum over an example's ground truths, averaged
    over ``references`` (every referenced id must have a prediction). An example whose ground
    truths are empty (unanswerable) counts as the single ground truth ``""``."""
    missing = [k for k in references if k not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
    if not references:
        raise ValueError("squad_metrics needs at least one question")
    em = f1 = 0.0
    has = no = 0
    for qid, truths in references.items():
        # as the official v2 script: ground truths that normalise to nothing are dropped
        truths = [t for t in truths if normalize_answer(t)] or [""]
        pred = predictions[qid]
        em += max(exact_match(pred, t) for t in truths)
        f1 += max(f1_score(pred, t) for t in truths)
        has, no = (has + 1, no) if any(truths) else (has, no + 1)
    n = len(references)
    return {
        "exact_match": 100.0 * em / n,
        "f1": 100.0 * f1 / n,
        "examples": n,
        "answerable": has,
        "unanswerable": no,
    }


def squad_units(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """Per question, as :func:`squad_metrics` scores it: ``exact_match`` and ``f1`` in percent
    (their means are :func:`squad_metrics`'s), by the question's position in ``references``."""
    em, f1 = [], []
    for qid, truths in references.items():
        truths = [t for t in truths if normalize_answer(t)] or [""]
        pred = predictions[qid]
        em.append(100.0 * max(exact_match(pred, t) for t in truths))
        f1.append(100.0 * max(f1_score(pred, t) for t in truths))
    import numpy as np

    return {"id": list(range(len(em))), "exact_match": np.array(em), "f1": np.array(f1)}


# ----------------------------------------------------------------------------------------- data


def _flatten_nested(obj: dict, path: Path) -> list[dict]:
    rows = []
    try:
        for article in obj["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                    rows.append(
                        {
                            "id": str(qa["id"]),
                            "question": qa["question"],
                            "context": para["context"],
                            "answers": {
                                "text": [a["text"] for a in answers],
                                "answer_start": [int(a["answer_start"]) for a in answers],
                            },
                        }
                    )
    except (KeyError, TypeError) as exc:
        raise DataError(f"data file {path}: not in the SQuAD format (missing {exc})") from None
    return rows


def _check_rows(rows: list[dict], path) -> list[dict]:
    try:
        return _check_rows_inner(rows, path)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(
            f"data file {path}: an 'answers' entry is not {{text: [...], answer_start: [...]}} "
            f"with integer starts ({type(exc).__name__}: {exc})"
        ) from None


def _check_rows_inner(rows: list[dict], path) -> list[dict]:
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"data file {path}: row {i} is not an object")
        for key in ("id", "question", "context", "answers"):
            if key not in r:
                raise DataError(f"data file {path}: row {i} has no {key!r} field")
        ans = r["answers"]
        if isinstance(ans, list):  # [{"text", "answer_start"}] per answer
            ans = {
                "text": [a["text"] for a in ans],
                "answer_start": [int(a["answer_start"]) for a in ans],
            }
            r["answers"] = ans
        ans["answer_start"] = [int(x) for x in ans["answer_start"]]
        if len(ans["text"]) != len(ans["answer_start"]):
            raise DataError(
                f"data file {path}: question {r['id']!r} has {len(ans['text'])} answer texts "
                f"and {len(ans['answer_start'])} starts"
            )
        for text, start in zip(ans["text"], ans["answer_start"]):
            if r["context"][start : start + len(text)] != text:
                raise DataError(
                    f"data file {path}: question {r['id']!r}: answer {text!r} is not at "
                    f"character {start} of its context"
                )
        r["id"] = str(r["id"])
    return rows


def read_squad_file(path: Path) -> list[dict]:
    """Rows ``{id, question, context, answers: {text, answer_start}}`` of a SQuAD file."""
    try:
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        else:
            obj = json.loads(path.read_text(encoding="utf-8"))
            rows = _flatten_nested(obj, path) if isinstance(obj, dict) and "data" in obj else obj
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"data file {path} could not be read: {exc}") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"data file {path}: no questions found")
    return _check_rows(rows, path)


def split_by_context(rows: list[dict], validation_fraction: float, seed: int):
    """Seeded train/validation split of whole contexts, so no passage is in both."""
    contexts = sorted({r["context"] for r in rows})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(contexts))
    n_val = max(1, int(round(validation_fraction * len(contexts))))
    if n_val >= len(contexts):
        raise DataError(
            f"question answering needs at least 2 distinct contexts to split, got {len(contexts)}"
        )
    val_contexts = {contexts[i] for i in order[:n_val]}
    train = [r for r in rows if r["context"] not in val_contexts]
    val = [r for r in rows if r["context"] in val_contexts]
    return train, val


# -------------------------------------------------------------------------------- preprocessing


def _pad_right(tokenizer) -> bool:
    return tokenizer.padding_side == "right"


def _encode(examples, tokenizer, max_length: int, doc_stride: int):
    """Question and context tokenized together (the context second, or first for a tokenizer
    that pads on the left), only the context truncated into overlapping windows. The question
    loses its leading white space (some questions have a lot, which wastes tokens); the context
    is kept as it is, so that character offsets index the original text."""
    pad_right = _pad_right(tokenizer)
    questions = [q.lstrip() for q in examples["question"]]
    check_room(examples["id"], questions, tokenizer, max_length, doc_stride)
    first, second = (
        (questions, examples["context"]) if pad_right else (examples["context"], questions)
    )
    return tokenizer(
        first,
        second,
        truncation="only_second" if pad_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def check_room(ids, questions, tokenizer, max_length: int, doc_stride: int) -> None:
    """Refuse a question that leaves no room for a window of context: the window must hold
    more than ``doc_stride`` context tokens beside the question and the special tokens."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for qid, n in zip(ids, lengths):
        if n + specials + doc_stride >= max_length:
            raise DataError(
                f"question {qid!r} has {n} tokens: with --max-length {max_length} and "
                f"--doc-stride {doc_stride} a window holds no new context; raise --max-length "
                f"or lower --doc-stride (to at most {max(max_length - n - specials - 1, 0)})"
            )


def _cls_index(ids: list[int], tokenizer) -> int:
    return ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0


def prepare_train_features(examples, tokenizer, max_length: int, doc_stride: int):
    """Tokenize a batch of examples into windows labelled with token start/end positions."""
    pad_right = _pad_right(tokenizer)
    enc = _encode(examples, tokenizer, max_length, doc_stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offsets_all):
        cls = _cls_index(enc["input_ids"][i], tokenizer)
        seq = enc.sequence_ids(i)
        answers = examples["answers"][sample_map[i]]
        if not answers["answer_start"]:
            starts.append(cls)
            ends.append(cls)
            continue
        a_start = answers["answer_start"][0]
        a_end = a_start + len(answers["text"][0])
        ctx = 1 if pad_right else 0
        tok_start = next(k for k, s in enumerate(seq) if s == ctx)
        tok_end = len(seq) - 1 - next(k for k, s in enumerate(reversed(seq)) if s == ctx)
        if not (offsets[tok_start][0] <= a_start and offsets[tok_end][1] >= a_end):
            starts.append(cls)  # the answer is not wholly inside this window
            ends.append(cls)
            continue
        # the walk stops at the window's last context token: past it come [SEP] and padding,
        # whose (0, 0) offsets would carry it on when the answer ends the window
        last = tok_end
        while tok_start <= last and offsets[tok_start][0] <= a_start:
            tok_start += 1
        while offsets[tok_end][1] >= a_end:
            tok_end -= 1
        starts.append(tok_start - 1)
        ends.append(tok_end + 1)
    enc["start_positions"] = starts
    enc["end_positions"] = ends
    return enc


def prepare_eval_features(examples, tokenizer, max_length: int, doc_stride: int):
    """Tokenize a batch of examples into windows that keep their example id, the character
    offsets of their context tokens (``None`` elsewhere), and the position of their ``[CLS]``
    token (the no-answer position the training labels use)."""
    pad_right = _pad_right(tokenizer)
    enc = _encode(examples, tokenizer, max_length, doc_stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    ctx = 1 if pad_right else 0
    enc["example_id"] = []
    enc["cls_index"] = []
    for i in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(i)
        enc["cls_index"].append(_cls_index(enc["input_ids"][i], tokenizer))
        enc["example_id"].append(examples["id"][sample_map[i]])
        enc["offset_mapping"][i] = [
            o if seq[k] == ctx else None for k, o in enumerate(enc["offset_mapping"][i])
        ]
    return enc


def postprocess(
    examples,
    features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
) -> dict[str, str]:
    """Answer text per example id from the windows' start and end logits (see the module)."""
    by_example = collections.defaultdict(list)
    for i, ex_id in enumerate(features["example_id"]):
        by_example[ex_id].append(i)
    predictions = {}
    for ex in examples:
        context = ex["context"]
        best_text, best_score = "", -np.inf
        null_score = np.inf
        for fi in by_example[ex["id"]]:
            s, e = start_logits[fi], end_logits[fi]
            offsets = features[fi]["offset_mapping"]
            cls = features[fi].get("cls_index", 0)
            null_score = min(null_score, float(s[cls] + e[cls]))
            top_s = np.argsort(s)[::-1][:n_best]
            top_e = np.argsort(e)[::-1][:n_best]
            for a in top_s:
                for b in top_e:
                    if a >= len(offsets) or b >= len(offsets):
                        continue
                    if offsets[a] is None or offsets[b] is None:
                        continue
                    if b < a or b - a + 1 > max_answer_length:
                        continue
                    score = float(s[a] + e[b])
                    if score > best_score:
                        best_score = score
                        best_text = context[offsets[a][0] : offsets[b][1]]
        if version_2 and null_score > best_score:
            best_text = ""
        predictions[ex["id"]] = best_text
    return predictions


@torch.no_grad()
def predict_logits(model, features, collator, batch_size: int, *, progress=False, desc="eval"):
    """Start and end logits of every evaluation feature (model inputs only)."""
    from tqdm.auto import tqdm

    inputs = [
        c for c in ("input_ids", "attention_mask", "token_type_ids") if c in features.features
    ]
    feats = features.select_columns(inputs).with_format("torch")
    loader = torch.utils.data.DataLoader(feats, batch_size=batch_size, collate_fn=collator)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    starts, ends = [], []
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            out = model(**{k: v.to(device) for k, v in batch.items()})
            starts.append(out.start_logits.float().cpu().numpy())
            ends.append(out.end_logits.float().cpu().numpy())
    finally:
        model.train(was)
    return np.concatenate(starts), np.concatenate(ends)
