"""A tiny BERT classifier saved to a folder with its tokenizer, and a tiny CSV task."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

WORDS = [
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "poor",
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "very",
]


def tiny_bert_config(vocab_size: int, num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )


def make_model_dir(root: Path, num_labels: int = 2) -> Path:
    from transformers import BertForSequenceClassification, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    cfg = tiny_bert_config(len(vocab), num_labels)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def make_csv(path: Path, n: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.randint(0, 1)
            pool = WORDS[:3] if label else WORDS[3:6]
            words = [rng.choice(pool)] + rng.sample(WORDS[6:], 3) + [rng.choice(pool)]
            w.writerow([" ".join(words), "pos" if label else "neg"])
    return path
