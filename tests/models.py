"""The tests' one set of tiny models and data (no downloads, all seeded): small trained torch
models and correlated inputs for the engine tests; tiny BERT, GPT-2, OPT and Llama models saved
with their tokenizers, and tiny classification, SQuAD and text tasks for the task and CLI tests."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch


def correlated_inputs(n=512, pairs=16, noise=0.02, seed=0):
    """Inputs made of near-duplicate feature pairs with very different scales per pair."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, pairs, generator=gen)
    scale = torch.logspace(-1, 0.5, pairs)
    x = torch.empty(n, 2 * pairs)
    x[:, 0::2] = base * scale
    x[:, 1::2] = base * scale + noise * torch.randn(n, pairs, generator=gen) * scale
    return x


def trained_mlp(x, classes=4, hidden=16, steps=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(x.shape[1], classes, generator=gen)
    y = (x @ teacher).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, y


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def ce_loss(model, batch):
    xb, yb = batch
    return torch.nn.functional.cross_entropy(model(xb), yb)


def full_loss(model, x, y):
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


#: keywords of prune() itself; any other keyword of :func:`prune_kw` is a part's setting
CALL_KEYWORDS = {"sparsity", "mask", "params", "global_sparsity", "masks", "max_memory", "progress"}


def prune_kw(lenient: bool = False, **kw) -> dict:
    """prune() keywords from call keywords and parts' settings by name (``gradients=8``):
    ``method`` (a name, default ``"obs"``) becomes its pipeline with those settings.

    ``lenient``: one dict of settings shared by cases of several methods; each method takes the
    settings its parts have (``gradients`` is a layer-wise method's ``batches``)."""
    from curvature.pruning import pipeline

    kw = dict(kw)
    pipe = pipeline(kw.pop("method", "obs"))
    settings = {k: kw.pop(k) for k in list(kw) if k not in CALL_KEYWORDS}
    if lenient:
        have = pipe.settings()
        if "batches" in have and "gradients" in settings and "batches" not in settings:
            settings["batches"] = settings["gradients"]
        settings = {k: v for k, v in settings.items() if k in have}
    return {**kw, "method": pipe.with_settings(**settings)}


def prune_copy(model, x, y, *, batch_size, **kw):
    """Prune a deep copy of ``model`` with cross-entropy gradients; returns (copy, report)."""
    import copy

    from curvature.pruning import prune

    m = copy.deepcopy(model)
    kw = {"progress": False, **kw}
    report = prune(m, batches(x, y, batch_size), loss_fn=ce_loss, **prune_kw(**kw))
    return m, report


# -------------------------------------------------------- tiny transformers and their tasks

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


def tiny_bert(vocab_size: int = 64, num_labels: int = 2):
    """The tiny BERT classifier of the tests, seeded (dropout on: call ``.eval()`` to remove it)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(vocab_size, num_labels))


def tiny_llama_config(vocab_size: int, **extra):
    """The tiny Llama of the tests (SmolLM2's parameter names), grouped-query attention; ``extra``
    overrides any size."""
    from transformers import LlamaConfig

    sizes = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    return LlamaConfig(vocab_size=vocab_size, **{**sizes, **extra})


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
            tiny_llama_config(v, max_position_embeddings=64, bos_token_id=2, eos_token_id=3,
                              pad_token_id=0)
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


# ------------------------------------------------------------------ a recipe for the CLI tests

#: a gradual OBS recipe for the tiny BERT classifier (MASK: the mask type to fill in)
RECIPE = """
num_epochs: 3.0
modifiers:
  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: eval(num_epochs)}
  - !LearningRateFunctionModifier {lr_func: linear, init_lr: 1e-3, final_lr: 1e-4, start_epoch: 0.0, end_epoch: eval(num_epochs)}
  - !OBSPruningModifier
    params: ["re:bert.encoder.layer.*.(intermediate|output).dense.weight"]
    init_sparsity: 0.3
    final_sparsity: 0.6
    start_epoch: 1.0
    end_epoch: 2.0
    update_frequency: 0.5
    mask_type: MASK
    num_grads: 8
    damp: 1.0e-6
    fisher_block_size: 8
    grad_sampler_kwargs: {batch_size: 4}
"""


def write_recipe(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return str(p)
