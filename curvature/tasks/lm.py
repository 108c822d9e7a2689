"""Language-model tasks on a text corpus: masked-LM (upstream pruning of encoders) and causal LM.

Corpus
    ``bbc-news`` (the texts of the 2,225 articles, labels dropped), a ``.txt`` file (one document
    per non-empty line), or a ``.csv`` / ``.jsonl`` / ``.json`` file with a ``text`` column.
    Documents are split into train/validation by a seeded shuffle, so no
    document is in both.

Masked LM
    Training: documents tokenized and concatenated (each ends with the separator token), cut into
    blocks of ``max_length`` tokens; 15% of the tokens are selected for prediction, of which 80%
    become ``[MASK]``, 10% a random token and 10% stay (the collator of ``transformers``).
    Evaluation: the validation blocks are masked once with a fixed seed, so every model is scored
    on the same masked positions; the metric is the mean cross-entropy over the masked tokens and
    its exponential, the perplexity.

Causal LM
    Training: concatenated blocks as above, next-token loss. Evaluation, the usual fixed-window
    protocol: the validation documents joined by the end-of-sequence token into one stream, scored
    by windows of ``max_length`` tokens that advance by ``stride`` tokens; each token is scored
    once, in the first window that reaches it, with the window's earlier tokens as context (up to
    ``max_length - stride`` tokens). Perplexity is ``exp`` of the mean negative log-likelihood per
    scored token. The stream's first token has no context and is not scored; with ``stride ==
    max_length`` (windows that do not overlap) neither is the first token of each window.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from curvature.tasks.data import DataError

EVAL_MASK_SEED = 1234  # the fixed masking of the masked-LM validation blocks


def read_corpus(name: str) -> list[str]:
    """The documents of a text corpus (see the module)."""
    from curvature.tasks.data import _bbc_news

    if name == "bbc-news":
        return list(_bbc_news()[0]["text"])
    path = Path(name)
    if not path.exists():
        raise DataError(f"data file {name} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            docs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        elif suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh))
            docs = _text_column(rows, path)
        elif suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            rows = (
                [json.loads(x) for x in text.splitlines() if x.strip()]
                if suffix == ".jsonl"
                else json.loads(text)
            )
            docs = _text_column(rows, path)
        else:
            raise DataError(f"data file {path}: expected a .txt, .csv, .jsonl or .json file")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"data file {path} could not be read: {exc}") from None
    docs = [d for d in docs if d and d.strip()]
    if len(docs) < 2:
        raise DataError(f"data file {path}: a corpus needs at least 2 non-empty documents")
    return docs


def _text_column(rows, path) -> list[str]:
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        raise DataError(f"data file {path}: expected rows with a 'text' field")
    if "text" not in rows[0]:
        raise DataError(f"data file {path} has no 'text' column (columns: {sorted(rows[0])})")
    return [str(r.get("text") or "") for r in rows]


def split_documents(docs: list[str], validation_fraction: float, seed: int):
    """A seeded shuffle of the documents, split; each part stays in the shuffled order, so
    ``--max-train`` / ``--max-eval`` take a sample (the BBC texts are stored by class)."""
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, int(round(validation_fraction * len(docs))))
    val = [docs[i] for i in order[:n_val]]
    train = [docs[i] for i in order[n_val:]]
    return train, val


def token_stream(docs: list[str], tokenizer, *, separator: int | None, with_documents=False):
    """The documents' tokens concatenated, each document followed by ``separator`` (if any);
    with ``with_documents``, also the index of the document each token belongs to (its
    separator included)."""
    out: list[int] = []
    doc_of: list[int] = []
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for d, ids in enumerate(enc):
        out.extend(ids)
        if separator is not None:
            out.append(separator)
        doc_of.extend([d] * (len(out) - len(doc_of)))
    return (out, doc_of) if with_documents else out


def blocks(stream: list[int], length: int, *, cls: int | None = None, sep: int | None = None):
    """Cut a token stream into full blocks of ``length`` tokens (the tail is dropped); with
    ``cls``/``sep`` each block is wrapped in them (an encoder's input format)."""
    inner = length - (cls is not None) - (sep is not None)
    if inner < 1:
        raise DataError(f"--max-length {length} leaves no room for tokens")
    out = []
    for i in range(0, len(stream) - inner + 1, inner):
        ids = stream[i : i + inner]
        if cls is not None:
            ids = [cls, *ids]
        if sep is not None:
            ids = [*ids, sep]
        out.append(ids)
    return out


def block_dataset(block_ids: list[list[int]], *, labels: bool):
    from datasets import Dataset

    cols = {"input_ids": block_ids, "attention_mask": [[1] * len(b) for b in block_ids]}
    if labels:
        cols["labels"] = [list(b) for b in block_ids]
    return Dataset.from_dict(cols)


def mask_once(
    dataset, collator, seed: int = EVAL_MASK_SEED, batch_size: int = 32
) -> list[dict[str, torch.Tensor]]:
    """Masked-LM evaluation batches masked once with a fixed seed (the global RNG is restored;
    the masked positions do not depend on ``batch_size``)."""
    rows = [dataset[i] for i in range(len(dataset))]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        masked = collator(rows)  # one draw over all blocks
    return [
        {k: v[i : i + batch_size] for k, v in masked.items()}
        for i in range(0, len(rows), batch_size)
    ]


@torch.no_grad()
def masked_lm_eval(model, batches, *, progress=False, desc="eval") -> dict:
    """Mean cross-entropy over the masked tokens of fixed-masked batches, and its perplexity."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    block_nll, block_count = [], []
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            per_token = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels, reduction="none", ignore_index=-100
            )
            block_nll.append(per_token.double().sum(1).cpu())
            block_count.append((labels != -100).sum(1).cpu())
    finally:
        model.train(was)
    nll_b, count_b = torch.cat(block_nll), torch.cat(block_count)
    count = int(count_b.sum())
    if count == 0:
        raise DataError("masked-LM evaluation: the validation blocks have no masked token")
    loss = float(nll_b.sum()) / count
    units = {"id": list(range(len(nll_b))), "nll": nll_b.numpy(), "tokens": count_b.numpy()}
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": count,
        "units": units,
    }


@torch.no_grad()
def causal_lm_eval(
    model,
    stream: list[int],
    *,
    max_length: int,
    stride: int,
    progress=False,
    desc="eval",
    documents: list[int] | None = None,
) -> dict:
    """Fixed-window perplexity of a token stream (see the module). With ``documents`` (the
    document of each stream position), ``units`` holds each document's summed negative
    log-likelihood and scored tokens (a token counts for the document it belongs to)."""
    from tqdm.auto import tqdm

    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if len(stream) < 2:
        raise DataError("causal-LM evaluation needs at least 2 validation tokens")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor(stream, dtype=torch.long)
    nll = 0.0
    count = 0
    per_doc_nll = torch.zeros(max(documents) + 1 if documents else 1, dtype=torch.float64)
    per_doc_count = torch.zeros_like(per_doc_nll)
    doc_of = torch.tensor(documents, dtype=torch.long) if documents else None
    scored_to = 1  # tokens [0, scored_to) are done (token 0 has no context)
    starts = range(0, len(stream) - 1, stride)
    try:
        for begin in tqdm(starts, desc=desc, disable=not progress, leave=False):
            end = min(begin + max_length, len(stream))
            if end <= scored_to:
                continue
            window = ids[begin:end].unsqueeze(0).to(device)
            logits = model(input_ids=window).logits[0, :-1].float()
            targets = window[0, 1:]
            # target k of the window is token begin + k + 1; score those not yet scored
            first = max(scored_to - begin - 1, 0)
            tok_nll = torch.nn.functional.cross_entropy(
                logits[first:], targets[first:], reduction="none"
            ).double()
            nll += float(tok_nll.sum())
            count += len(targets) - first
            if doc_of is not None:
                which = doc_of[begin + 1 + first : end]
                per_doc_nll.index_add_(0, which, tok_nll.cpu())
                per_doc_count.index_add_(0, which, torch.ones_like(tok_nll.cpu()))
            scored_to = end
            if end == len(stream):
                break
    finally:
        model.train(was)
    loss = nll / count
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if doc_of is not None:
        keep = per_doc_count > 0  # a one-token first document has nothing scored
        ids = torch.arange(len(per_doc_nll))[keep]
        out["units"] = {
            "id": ids.tolist(),
            "nll": per_doc_nll[keep].numpy(),
            "tokens": per_doc_count[keep].numpy(),
        }
    return out
