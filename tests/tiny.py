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


# ------------------------------------------------------------------- tasks beyond classification

QA_WORDS = [
    "what", "where", "who", "is", "was", "in", "of", "lives", "city", "river", "name", "capital",
    "paris", "rome", "oslo", "lima", "cairo", "anna", "ben", "carl", "dora", "north", "south",
    "big", "small", "old", "new", "near", "far", "and", "it", ".", "?", ",",
]  # fmt: skip


def make_tokenizer(root: Path, words: list[str], *, eos: bool = False):
    """A word-piece tokenizer over ``words`` (with offsets), saved to ``root``."""
    from transformers import BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    kwargs = {"eos_token": "[SEP]", "bos_token": "[CLS]"} if eos else {}
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, **kwargs)
    tok.save_pretrained(root)
    return tok


def make_task_model_dir(root: Path, task: str, arch: str = "bert", words=None) -> Path:
    """A tiny model with the head of ``task`` (bert; or gpt2/opt/llama for causal-lm)."""
    import transformers as tf

    words = list(words or QA_WORDS)
    tok = make_tokenizer(root, words, eos=arch != "bert")
    v = len(tok)
    torch.manual_seed(0)
    if arch == "bert":
        cfg = tiny_bert_config(v)
        cfg.max_position_embeddings = 64
        head = {
            "question-answering": tf.BertForQuestionAnswering,
            "masked-lm": tf.BertForMaskedLM,
            "sequence-classification": tf.BertForSequenceClassification,
        }[task]
        model = head(cfg)
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=v, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                          bos_token_id=2, eos_token_id=3, pad_token_id=0)
        )  # fmt: skip
    elif arch == "opt":
        model = tf.OPTForCausalLM(
            tf.OPTConfig(vocab_size=v, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                         num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0)
        )  # fmt: skip
    elif arch == "llama":
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                           bos_token_id=2, eos_token_id=3, pad_token_id=0)
        )  # fmt: skip
    else:
        raise ValueError(arch)
    model.save_pretrained(root)
    return root


def make_squad(path: Path, n_contexts: int = 12, seed: int = 0, *, v2: bool = False) -> Path:
    """A SQuAD-format file (nested, as published): short contexts of facts, a question per fact;
    with ``v2`` every third question asks about a person the context does not name."""
    import json

    rng = random.Random(seed)
    people = ["anna", "ben", "carl", "dora"]
    cities = ["paris", "rome", "oslo", "lima", "cairo"]
    articles = []
    qid = 0
    for c in range(n_contexts):
        facts = rng.sample(people, 3)
        where = [rng.choice(cities) for _ in facts]
        sentences = [f"{p} lives in {w} ." for p, w in zip(facts, where)]
        context = " ".join(sentences)
        qas = []
        for p, w in zip(facts, where):
            sentence = f"{p} lives in {w} ."
            start = context.index(sentence) + len(f"{p} lives in ")
            qas.append({"id": f"q{qid}", "question": f"where lives {p} ?",
                        "answers": [{"text": w, "answer_start": start}]})  # fmt: skip
            qid += 1
        if v2 and c % 3 == 0:
            missing = next(p for p in people if p not in facts)
            qas.append({"id": f"q{qid}", "question": f"where lives {missing} ?", "answers": [],
                        "is_impossible": True})  # fmt: skip
            qid += 1
        articles.append({"title": f"t{c}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "v2.0" if v2 else "1.1", "data": articles}))
    return path


def make_corpus(path: Path, n_docs: int = 24, seed: int = 0, words=None) -> Path:
    """A .txt corpus, one short document per line."""
    rng = random.Random(seed)
    words = list(words or QA_WORDS[:-3])
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(12, 30))) for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path
