"""The task layer: question answering (SQuAD), sentence pairs, masked and causal LM, sparse
transfer; each through its preprocessing, metric, a prune run of the CLI and plain transformers."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from models import (
    QA_WORDS,
    make_corpus,
    make_csv,
    make_squad,
    make_task_model_dir,
    make_tokenizer,
)

from curvature.cli.main import main
from curvature.tasks import lm, qa
from curvature.tasks.data import DataError
from curvature.tasks.kinds import classification_eval, infer_task, prepare

SHARED = Path(__file__).resolve().parents[3] / "shared" / "published-recipes" / "obert"
ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- SQuAD metric


def test_squad_metric_on_crafted_predictions_equals_hand_values():
    assert qa.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert qa.normalize_answer("an apple, a pear") == "apple pear"
    predictions = {"a": "the Eiffel Tower", "b": "Paris, France", "c": "", "d": "London", "e": ""}
    references = {
        "a": ["Eiffel Tower"],  # articles and case normalised away: EM 1, F1 1
        "b": ["Paris"],  # EM 0; F1 precision 1/2, recall 1 -> 2/3
        "c": [],  # unanswerable, empty prediction: 1 and 1
        "d": ["Paris", "London"],  # the maximum over the ground truths: 1 and 1
        "e": ["Rome"],  # answerable, empty prediction: 0 and 0
    }
    m = qa.squad_metrics(predictions, references)
    assert m["exact_match"] == pytest.approx(100 * 3 / 5)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 1 + 0) / 5)
    assert (m["answerable"], m["unanswerable"]) == (4, 1)
    # repeated tokens count once each (bag of tokens): "cat cat" vs "cat" -> P 1/2, R 1
    assert qa.f1_score("a cat cat", "the cat") == pytest.approx(2 / 3)
    assert qa.f1_score("", "") == 1.0 and qa.exact_match("Paris.", "paris") == 1.0
    with pytest.raises(ValueError, match="no prediction"):
        qa.squad_metrics({}, {"x": ["y"]})


# ---------------------------------------------------------------------- SQuAD preprocessing


def _long_context_rows(n=6, facts=8, seed=0):
    rng = random.Random(seed)
    people, cities = ["anna", "ben", "carl", "dora"], ["paris", "rome", "oslo", "lima", "cairo"]
    rows = []
    for i in range(n):
        sentences = [f"{rng.choice(people)} lives in {rng.choice(cities)} ." for _ in range(facts)]
        context = " ".join(sentences)
        k = rng.randrange(facts)
        start = len(" ".join(sentences[:k])) + (1 if k else 0)
        answer = sentences[k].split()[3]
        start += sentences[k].index(answer)
        assert context[start : start + len(answer)] == answer
        rows.append(
            {
                "id": f"x{i}",
                "question": "where lives she ?",
                "context": context,
                "answers": {"text": [answer], "answer_start": [start]},
            }
        )
    return rows


def test_qa_windows_map_back_to_the_answer_text_across_doc_stride(tmp_path):
    from datasets import Dataset

    tok = make_tokenizer(tmp_path / "tok", QA_WORDS)
    rows = _long_context_rows()
    ex = Dataset.from_list(rows)
    L, stride = 24, 10
    train = qa.prepare_train_features(ex[:], tok, L, stride)
    evalf = qa.prepare_eval_features(ex[:], tok, L, stride)  # the same windows, with offsets
    assert len(train["input_ids"]) == len(evalf["input_ids"]) > 2 * len(rows)  # several windows
    labelled = {r["id"]: 0 for r in rows}
    unlabelled = 0
    for i, ex_id in enumerate(evalf["example_id"]):
        row = next(r for r in rows if r["id"] == ex_id)
        s, e = train["start_positions"][i], train["end_positions"][i]
        if s == 0 and e == 0:  # [CLS]: the answer is not wholly inside this window
            unlabelled += 1
            continue
        off = evalf["offset_mapping"][i]
        assert off[s] is not None and off[e] is not None  # inside the context
        assert row["context"][off[s][0] : off[e][1]] == row["answers"]["text"][0]
        labelled[ex_id] += 1
    assert all(n >= 1 for n in labelled.values())  # every answer is found in some window
    assert any(n >= 2 for n in labelled.values())  # an answer in the overlap of two windows
    assert unlabelled > 0
    # a window boundary that cuts an answer: a 2-word answer split by a 1-token stride
    row = dict(rows[0])
    words = row["context"].split()
    row["answers"] = {
        "text": [" ".join(words[10:13])],
        "answer_start": [len(" ".join(words[:10])) + 1],
    }
    feats = qa.prepare_train_features(Dataset.from_list([row])[:], tok, 16, 2)
    offs = qa.prepare_eval_features(Dataset.from_list([row])[:], tok, 16, 2)["offset_mapping"]
    text = row["answers"]["text"][0]
    for s, e, off in zip(feats["start_positions"], feats["end_positions"], offs):
        if s:
            assert row["context"][off[s][0] : off[e][1]] == text
    assert 0 in feats["start_positions"] and any(feats["start_positions"])


def test_qa_postprocess_picks_the_best_valid_span_over_windows():
    context = "anna lives in rome ."
    examples = [{"id": "a", "context": context}]
    # two windows; token offsets None outside the context (question and special tokens)
    off = [None, None, (0, 4), (5, 10), (11, 13), (14, 18), (19, 20), None]
    features = [{"example_id": "a", "offset_mapping": off}] * 2
    feats = {"example_id": ["a", "a"]}

    class F(list):
        def __getitem__(self, k):
            return feats[k] if isinstance(k, str) else list.__getitem__(self, k)

    s = np.full((2, 8), -10.0)
    e = np.full((2, 8), -10.0)
    s[0, 1], e[0, 1] = 9.0, 9.0  # the best logits are in the question: not a valid span
    s[0, 6], e[0, 2] = 5.0, 5.0  # end before start: not valid
    s[0, 3], e[0, 5] = 1.0, 1.0  # "lives in rome": 2
    s[1, 5], e[1, 5] = 2.0, 1.5  # "rome" in the second window: 3.5, the best
    assert qa.postprocess(examples, F(features), s, e) == {"a": "rome"}
    assert qa.postprocess(examples, F(features), s, e, max_answer_length=0) == {"a": ""}
    # SQuAD v2: the [CLS] score (start[0] + end[0], the smallest over windows) against the best
    s[:, 0], e[:, 0] = 2.0, 2.0  # 4 > 3.5: no answer
    assert qa.postprocess(examples, F(features), s, e, version_2=True) == {"a": ""}
    assert qa.postprocess(examples, F(features), s, e, version_2=False) == {"a": "rome"}
    s[:, 0] = 1.0  # 3 < 3.5: the span
    assert qa.postprocess(examples, F(features), s, e, version_2=True) == {"a": "rome"}


def test_squad_files_nested_and_flat_and_bad_ones(tmp_path):
    nested = make_squad(tmp_path / "s.json", v2=True)
    rows = qa.read_squad_file(nested)
    assert any(not r["answers"]["text"] for r in rows)  # v2's unanswerable questions
    flat = tmp_path / "s.jsonl"
    flat.write_text("\n".join(json.dumps(r) for r in rows))
    assert qa.read_squad_file(flat) == rows
    train, val = qa.split_by_context(rows, 0.25, seed=0)
    assert not {r["context"] for r in train} & {r["context"] for r in val}
    bad = dict(rows[0], answers={"text": ["nowhere"], "answer_start": [0]})
    flat.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="is not at character 0"):
        qa.read_squad_file(flat)


# --------------------------------------------------------------------------- sentence pairs


def test_sentence_pairs_tokenize_as_pairs_and_report_f1(tmp_path):
    path = tmp_path / "nli.csv"
    rng = random.Random(0)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["premise", "hypothesis", "label", "idx"])
        for i in range(40):
            w.writerow(["good movie", rng.choice(["great film", "awful plot"]), i % 2, i])
    model_dir = make_task_model_dir(tmp_path / "m", "sequence-classification", words=None)
    p = prepare(None, str(model_dir), str(path), max_length=16)
    assert p.task == "sequence-classification"
    assert p.info["text_columns"] == ["premise", "hypothesis"]
    assert 1 in p.train[0]["token_type_ids"]  # the second segment
    ev = p.evaluate(p.model)
    assert {"accuracy", "f1", "loss"} <= set(ev)

    class Fixed(torch.nn.Module):  # predictions 1,1,0,0,1 against labels 1,0,1,0,1
        config = type("C", (), {"num_labels": 2})()

        def forward(self, labels, **kw):
            logits = torch.tensor([[0.0, 1.0], [0, 1], [1, 0], [1, 0], [0, 1]])
            return type("O", (), {"logits": logits, "loss": torch.tensor(0.0)})()

    Fixed.parameters = lambda self: iter([torch.zeros(1)])
    m = classification_eval(Fixed(), [{"labels": torch.tensor([1, 0, 1, 0, 1])}])
    # tp 2, fp 1, fn 1: F1 = 4 / 6; accuracy 3/5
    assert m["f1"] == pytest.approx(4 / 6) and m["accuracy"] == pytest.approx(0.6)


# ------------------------------------------------------------------------- language models


def test_masked_lm_evaluation_is_fixed_and_equals_its_definition(tmp_path):
    model_dir = make_task_model_dir(tmp_path / "m", "masked-lm")
    corpus = make_corpus(tmp_path / "c.txt")
    p = prepare("masked-lm", str(model_dir), str(corpus), max_length=16)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = p.evaluate(p.model)
    assert torch.equal(state, torch.get_rng_state())  # the fixed masking leaves the RNG alone
    b = p.evaluate(p.model)
    ua, ub = a.pop("units"), b.pop("units")
    assert a == b and a["tokens"] > 0
    assert all(np.array_equal(ua[k], ub[k]) for k in ua)
    # per-block units sum to the totals
    assert ua["tokens"].sum() == a["tokens"]
    assert ua["nll"].sum() / ua["tokens"].sum() == pytest.approx(a["loss"], rel=1e-12)
    assert a["perplexity"] == pytest.approx(math.exp(a["loss"]))
    # the mean over masked tokens, recomputed directly from one fixed masking
    from transformers import DataCollatorForLanguageModeling

    val_docs = lm.split_documents(lm.read_corpus(str(corpus)), 0.2, 0)[1]
    tok = p.tokenizer
    ids = lm.blocks(
        lm.token_stream(val_docs, tok, separator=tok.sep_token_id),
        16,
        cls=tok.cls_token_id,
        sep=tok.sep_token_id,
    )
    batches = lm.mask_once(
        lm.block_dataset(ids, labels=False), DataCollatorForLanguageModeling(tok)
    )
    nll = n = 0.0
    p.model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = p.model(input_ids=batch["input_ids"]).logits
            keep = batch["labels"] != -100
            lp = torch.log_softmax(logits.double(), -1)[keep]
            nll -= lp.gather(1, batch["labels"][keep][:, None]).sum().item()
            n += keep.sum().item()
    assert a["loss"] == pytest.approx(nll / n, rel=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
@pytest.mark.parametrize("L,stride", [(16, 5), (16, 16), (16, 1), (64, 8)])
def test_causal_lm_window_perplexity_equals_per_token_brute_force(tmp_path, arch, L, stride):
    from transformers import AutoModelForCausalLM

    folder = make_task_model_dir(tmp_path / arch, "causal-lm", arch)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    stream = [
        int(x) for x in torch.randint(5, 30, (41,), generator=torch.Generator().manual_seed(1))
    ]
    got = lm.causal_lm_eval(model, stream, max_length=L, stride=stride)
    # each token t >= 1 scored once, in the first window [b, b + L) (b a multiple of the stride)
    # that holds it and a token before it, with the window's tokens before it as context; with
    # stride == L the first token of each window has none and is not scored
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(stream)):
            b = next((b for b in range(0, t, stride) if b + L > t), None)
            if b is None:
                assert stride == L and t % L == 0
                continue
            ctx = torch.tensor([stream[b : t + 1]])
            logp = torch.log_softmax(model(input_ids=ctx).logits[0, -2].double(), -1)
            nll -= logp[stream[t]].item()
            n += 1
    assert got["tokens"] == n == len(stream) - 1 - (len(stream) - 1) // L * (stride == L)
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)


@pytest.mark.parametrize("L,stride", [(16, 5), (16, 16), (8, 3)])
def test_causal_lm_per_document_units_split_the_total_by_document(tmp_path, L, stride):
    """Every scored token counts for the document it belongs to: the documents' sums are the
    totals, and a document's loss equals the per-token losses of its own tokens."""
    from transformers import AutoModelForCausalLM

    folder = make_task_model_dir(tmp_path / "llama", "causal-lm", "llama")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(2)
    lengths = [1, 7, 3, 12, 9]  # a one-token first document: nothing of it is scored
    stream, documents = [], []
    for d, n in enumerate(lengths):
        stream += [int(x) for x in torch.randint(5, 30, (n,), generator=g)]
        documents += [d] * n
    got = lm.causal_lm_eval(model, stream, max_length=L, stride=stride, documents=documents)
    plain = lm.causal_lm_eval(model, stream, max_length=L, stride=stride)
    u = got["units"]
    assert got["loss"] == pytest.approx(plain["loss"], rel=1e-12)
    assert u["tokens"].sum() == got["tokens"]
    assert u["nll"].sum() / u["tokens"].sum() == pytest.approx(got["loss"], rel=1e-12)
    assert u["id"] == [1, 2, 3, 4]  # document 0's only token has no context
    if stride == 1:
        return
    # document 3 alone: its tokens' losses, scored as the window scheme scores them
    assert u["tokens"].tolist() == [
        sum(1 for t in range(1, len(stream)) if documents[t] == d and _scored(t, L, stride))
        for d in u["id"]
    ]


def _scored(t, L, stride):
    return any(b + L > t for b in range(0, t, stride))


def test_classification_units_hold_what_the_metrics_count():
    class Fixed(torch.nn.Module):  # predictions 1,1,0,0,1 against labels 1,0,1,0,1
        config = type("C", (), {"num_labels": 2})()

        def forward(self, labels, **kw):
            logits = torch.tensor([[0.0, 1.0], [0, 2], [1, 0], [3, 0], [0, 1]])
            return type("O", (), {"logits": logits})()

    Fixed.parameters = lambda self: iter([torch.zeros(1)])
    m = classification_eval(Fixed(), [{"labels": torch.tensor([1, 0, 1, 0, 1])}])
    u = m["units"]
    assert u["id"] == [0, 1, 2, 3, 4]
    assert u["prediction"].tolist() == [1, 1, 0, 0, 1] and u["correct"].tolist() == [1, 0, 0, 1, 1]
    sig = 1 / (1 + math.exp(-1))
    assert u["confidence"].tolist() == pytest.approx(
        [sig, 1 / (1 + math.exp(-2)), sig, 1 / (1 + math.exp(-3)), sig]
    )
    assert u["loss"].mean() == pytest.approx(m["loss"])
    assert u["f1_num"].sum() / u["f1_den"].sum() == pytest.approx(m["f1"])


# ---------------------------------------------------------------------------- task choice


def test_the_task_is_inferred_from_data_and_model_or_refused(tmp_path):
    bert = make_task_model_dir(tmp_path / "bert", "masked-lm")
    gpt = make_task_model_dir(tmp_path / "gpt", "causal-lm", "gpt2")
    squad = make_squad(tmp_path / "s.json")
    corpus = make_corpus(tmp_path / "c.txt")
    labelled = make_csv(tmp_path / "l.csv")
    texts = tmp_path / "t.csv"
    texts.write_text("text\nhello there\ngood film\n")
    assert infer_task(str(bert), str(squad)) == "question-answering"
    assert infer_task(str(bert), str(labelled)) == "sequence-classification"
    assert infer_task("default", "bbc-news") == "sequence-classification"
    assert infer_task(str(bert), str(corpus)) == "masked-lm"
    assert infer_task(str(gpt), str(texts)) == "causal-lm"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    (plain / "config.json").write_text(json.dumps({"architectures": ["XForTokenClassification"]}))
    assert infer_task(str(plain), str(corpus)) == "masked-lm"  # an encoder: masked LM
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="pass --task with one of sequence-classification, "):
        infer_task(str(bert), str(odd))
    with pytest.raises(DataError, match="did you mean 'masked-lm'"):
        prepare("masked_lm", str(bert), str(corpus))


# ------------------------------------------------------------------- prune runs, end to end

RECIPE = """
num_epochs: 2.0
modifiers:
  - !EpochRangeModifier {{start_epoch: 0.0, end_epoch: 2.0}}
  - !OBSPruningModifier
    params: ["{params}"]
    init_sparsity: 0.3
    final_sparsity: 0.5
    start_epoch: 1.0
    end_epoch: 1.5
    update_frequency: 0.5
    num_grads: 4
    fisher_block_size: 8
    damp: 1.0e-4
    grad_sampler_kwargs: {{batch_size: 2}}
  - !DistillationModifier {{hardness: 0.5, temperature: 2.0, distill_output_keys: {keys}}}
"""

CASES = {
    # task: (head, arch, data maker, params pattern, distilled outputs)
    "question-answering": ("question-answering", "bert", "squad", "re:bert.encoder.*weight",
                           "[start_logits, end_logits]"),
    "pairs": ("sequence-classification", "bert", "pairs", "re:bert.encoder.*weight", "[logits]"),
    "masked-lm": ("masked-lm", "bert", "corpus", "re:bert.encoder.*weight", "[logits]"),
    "causal-lm-gpt2": ("causal-lm", "gpt2", "corpus", "re:transformer.h.*weight", "[logits]"),
    "causal-lm-llama": ("causal-lm", "llama", "corpus", "re:model.layers.*proj.weight", "[logits]"),
}  # fmt: skip


def _data(kind: str, tmp_path: Path) -> Path:
    if kind == "squad":
        return make_squad(tmp_path / "squad.json", v2=True)
    if kind == "corpus":
        return make_corpus(tmp_path / "c.txt", n_docs=30)
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question1", "question2", "label"])
        for i in range(40):
            w.writerow(["where lives anna ?", f"where lives {['anna', 'ben'][i % 2]} ?", i % 2])
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_prune_cli_runs_each_task_with_distillation_and_saves_plain_loadable_zeros(
    tmp_path, case, capsys
):
    import transformers

    from curvature.tasks.kinds import _HEADS

    head, arch, data_kind, params, keys = CASES[case]
    model_dir = make_task_model_dir(tmp_path / "m", head, arch)
    data = _data(data_kind, tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(params=params, keys=keys))
    out = tmp_path / "out"
    argv = ["prune", str(recipe), "--model", str(model_dir), "--data", str(data), "--output",
            str(out), "--teacher", "self", "--max-length", "32", "--batch-size", "4",
            "--no-progress"]  # fmt: skip
    if head == "question-answering":
        argv += ["--doc-stride", "8"]
    assert main(argv) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == head and m["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert m["metric"] in m["pruned"]
    # every metric with its interval, and the pruned model's paired difference against dense
    base = {k for k in m["dense"] if "_ci_" not in k and "_delta" not in k}
    assert base == {k for k in m["pruned"] if "_ci_" not in k and "_delta" not in k}
    metric = m["metric"]
    for ev in (m["dense"], m["pruned"]):
        assert ev[f"{metric}_ci_low"] <= ev[metric] <= ev[f"{metric}_ci_high"]
    delta = m["pruned"][f"{metric}_delta"]
    assert delta == pytest.approx(m["pruned"][metric] - m["dense"][metric])
    assert m["pruned"][f"{metric}_delta_ci_low"] <= delta <= m["pruned"][f"{metric}_delta_ci_high"]
    assert {f.name for f in (out / "predictions").iterdir()} == {"dense.csv", "pruned.csv"}
    assert "<table>" in (out / "report.html").read_text()
    assert m["steps"] > 0 and len(m["pruning_steps"]) == 2
    report = (out / "report.md").read_text()
    assert f"validation {m['metric'].replace('_', ' ')}" in report
    # plain transformers loads the saved model with its zeros where the job left them
    model = getattr(transformers, _HEADS[head]).from_pretrained(out)
    params_ = dict(model.named_parameters())
    for name, sparsity in m["param_sparsity"].items():
        assert float((params_[name] == 0).float().mean()) == pytest.approx(sparsity)
    assert sum(m["param_sparsity"].values()) / len(m["param_sparsity"]) > 0.3


def test_a_distilling_recipe_without_a_teacher_is_refused(tmp_path, capsys):
    model_dir = make_task_model_dir(tmp_path / "m", "masked-lm")
    corpus = make_corpus(tmp_path / "c.txt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(params="re:bert.encoder.*weight", keys="[logits]"))
    argv = ["prune", str(recipe), "--model", str(model_dir), "--data", str(corpus), "--output",
            str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "names no teacher: pass --teacher FOLDER" in err and len(err.splitlines()) == 1
    transfer = ROOT / "recipes" / "obert-bert-base-sparse-transfer-mnli.yaml"
    argv[1] = str(transfer)
    assert main([*argv, "--teacher", "self"]) == 2
    assert "this recipe never prunes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------- sparse transfer


def _sparsify(folder: Path, head, fraction=0.6, seed=0) -> dict[str, torch.Tensor]:
    """Zero a random ``fraction`` of every encoder matrix of a saved model; return the masks."""
    model = head.from_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("bert.encoder") and p.dim() == 2:
                keep = torch.rand(p.shape, generator=gen) >= fraction
                p.mul_(keep)
                masks[name] = keep
    model.save_pretrained(folder)
    return masks


def test_sparse_transfer_keeps_every_zero_through_training_and_saving(tmp_path, capsys):
    import transformers

    up = make_task_model_dir(tmp_path / "up", "masked-lm")
    masks = _sparsify(up, transformers.BertForMaskedLM)
    data = tmp_path / "d.csv"
    rng = random.Random(0)
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(48):
            w.writerow(
                [f"{rng.choice(['anna', 'ben'])} lives in {rng.choice(['rome', 'oslo'])}", i % 2]
            )
    out = tmp_path / "out"
    recipe = ROOT / "recipes" / "minilm-sparse-transfer.yaml"
    argv = ["prune", str(recipe), "--model", str(up), "--data", str(data), "--output", str(out),
            "--max-length", "16", "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    before = transformers.BertForMaskedLM.from_pretrained(up).state_dict()
    after = transformers.BertForSequenceClassification.from_pretrained(out)
    state = after.state_dict()
    for name, keep in masks.items():
        assert torch.equal(state[name] == 0, ~keep | (before[name] == 0)), name
        assert not torch.equal(state[name], before[name])  # the kept weights did train
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["sparsity"] == pytest.approx(0.6, abs=0.02)


@pytest.mark.skipif(not SHARED.is_dir(), reason="the published recipes are not beside the repo")
def test_published_squad_sparse_transfer_recipe_runs_unchanged_with_a_teacher(tmp_path, capsys):
    import transformers

    up = make_task_model_dir(tmp_path / "up", "question-answering")
    masks = _sparsify(up, transformers.BertForQuestionAnswering)
    teacher = make_task_model_dir(tmp_path / "teacher", "question-answering")
    squad = make_squad(tmp_path / "s.json", n_contexts=8)
    out = tmp_path / "out"
    argv = ["prune", str(SHARED / "8epochs_sparse_transfer_squad.yaml"), "--model", str(up),
            "--data", str(squad), "--teacher", str(teacher), "--output", str(out),
            "--max-length", "32", "--doc-stride", "8", "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 8 and {"exact_match", "f1"} <= set(m["pruned"])
    state = transformers.BertForQuestionAnswering.from_pretrained(out).state_dict()
    for name, keep in masks.items():
        assert torch.equal(state[name] == 0, ~keep), name


# ---------------------------------------------------------------- HF Trainer, every task


@pytest.mark.parametrize("case", ["question-answering", "masked-lm", "causal-lm-llama", "pairs"])
def test_recipe_callback_in_a_plain_trainer_prunes_every_task(tmp_path, case):
    from transformers import Trainer, TrainingArguments

    from curvature.integrations.hf import RecipeCallback
    from curvature.recipes import RecipeManager, parse_recipe

    head, arch, data_kind, params, _ = CASES[case]
    model_dir = make_task_model_dir(tmp_path / "m", head, arch)
    stride = 8 if head == "question-answering" else None
    p = prepare(
        head, str(model_dir), str(_data(data_kind, tmp_path)), max_length=32, doc_stride=stride
    )
    text = RECIPE.format(params=params, keys="[logits]").split("  - !Distillation")[0]
    manager = RecipeManager(parse_recipe(text), p.model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), num_train_epochs=2, per_device_train_batch_size=4,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=p.model, args=args, train_dataset=p.train, data_collator=p.collator,
        callbacks=[RecipeCallback(manager, grad_dataset=p.train, collator=p.collator,
                                  grad_batch_size=2, progress=False)],
    )  # fmt: skip
    trainer.train()
    assert manager.sparsity() == pytest.approx(0.5, abs=0.01)
    ev = p.evaluate(p.model)
    assert math.isfinite(ev[p.metric])


def test_sweep_of_a_language_model_reports_perplexity(tmp_path):
    from curvature.cli.sweep import SweepConfig, run_sweep

    model_dir = make_task_model_dir(tmp_path / "m", "masked-lm")
    corpus = make_corpus(tmp_path / "c.txt", n_docs=30)
    cfg = SweepConfig(
        output=str(tmp_path / "sweep"), model=str(model_dir), data=str(corpus),
        methods=["obs", "magnitude"], sparsities=[0.5], finetune_epochs=0, max_length=16,
        params=["re:bert.encoder.*weight"], gradients=4, block_size=8, fisher_damping=1e-4,
        progress=False,
    )  # fmt: skip
    points = run_sweep(cfg)
    assert {p["method"] for p in points} == {"dense", "obs", "magnitude"}
    assert all(p["metric"] == "perplexity" and p["perplexity"] > 1 for p in points)
    header = (tmp_path / "sweep" / "results.csv").read_text().splitlines()[0].split(",")
    assert "perplexity" in header and "accuracy" not in header
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "| perplexity [95% CI] | vs dense, paired [95% CI] | loss | size" in md
    row = next(r for r in json.loads((tmp_path / "sweep" / "results.json").read_text())
               if r["method"] == "obs")  # fmt: skip
    assert row["perplexity_ci_low"] <= row["perplexity"] <= row["perplexity_ci_high"]
    assert "ece" not in row and "pies" not in row  # classification only
    assert (tmp_path / "sweep" / "accuracy_vs_sparsity.png").stat().st_size > 0
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep["task"] == "masked-lm"  # inferred for an encoder and a text corpus, and recorded


@pytest.mark.slow  # 7 x 1024 gradients: several minutes on 2 cores
@pytest.mark.skipif(not SHARED.is_dir(), reason="the published recipes are not beside the repo")
def test_published_squad_pruning_recipe_runs_unchanged_through_the_cli(tmp_path, capsys):
    """30epochs_unstructured80_squad.yaml as published (30 epochs, 7 OBS points of 1024
    gradients, distillation over start and end logits) on a tiny QA BERT and a tiny SQuAD file."""
    model_dir = make_task_model_dir(tmp_path / "m", "question-answering")
    squad = make_squad(tmp_path / "s.json", n_contexts=5)
    out = tmp_path / "out"
    argv = ["prune", str(SHARED / "30epochs_unstructured80_squad.yaml"), "--model",
            str(model_dir), "--data", str(squad), "--teacher", "self", "--output", str(out),
            "--max-length", "32", "--batch-size", "16", "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert [round(s["epoch"]) for s in m["pruning_steps"]] == [2, 6, 10, 14, 18, 22, 26]
    assert m["sparsity"] == pytest.approx(0.8, abs=1e-3) and m["epochs"] == 30
    assert m["task"] == "question-answering" and {"exact_match", "f1"} <= set(m["pruned"])


def test_a_separate_validation_file_for_every_task(tmp_path):
    bert_qa = make_task_model_dir(tmp_path / "qa", "question-answering")
    train, dev = make_squad(tmp_path / "t.json", seed=0), make_squad(tmp_path / "d.json", seed=1)
    p = prepare(None, str(bert_qa), str(train), eval_data=str(dev), max_length=32)
    assert p.info["train_examples"] == 36 and p.info["validation_examples"] == 36
    cls = make_task_model_dir(tmp_path / "cls", "masked-lm")  # a new 3-label head on it
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("text,label\nanna lives,north\nben lives,south\nanna,north\n")
    b.write_text("text,label\ncarl lives,west\nben,south\n")  # a class the training file lacks
    p = prepare(None, str(cls), str(a), eval_data=str(b), max_length=16)
    assert p.label_names == ["north", "south", "west"]
    assert p.model.config.num_labels == 3 and p.info["validation_examples"] == 2
    assert [int(x) for x in p.train["labels"]] in ([0, 1, 0], [0, 0, 1], [1, 0, 0])
    mlm = make_task_model_dir(tmp_path / "mlm", "masked-lm")
    c1, c2 = make_corpus(tmp_path / "c1.txt", seed=0), make_corpus(tmp_path / "c2.txt", seed=1)
    p = prepare(None, str(mlm), str(c1), eval_data=str(c2), max_length=16)
    assert p.info["train_documents"] == 24 and p.info["validation_documents"] == 24
    with pytest.raises(DataError, match="data file .*nope.txt does not exist"):
        prepare(None, str(mlm), str(c1), eval_data=str(tmp_path / "nope.txt"), max_length=16)


def test_train_a_decoder_with_a_curvature_optimizer_reports_perplexity(tmp_path, capsys):
    model_dir = make_task_model_dir(tmp_path / "m", "causal-lm", "llama")
    corpus = make_corpus(tmp_path / "c.txt")
    out = tmp_path / "out"
    argv = ["train", "--optimizer", "adahessian", "--model", str(model_dir), "--data",
            str(corpus), "--output", str(out), "--max-steps", "3", "--eval-every", "1",
            "--max-length", "16", "--batch-size", "4", "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "causal-lm" and m["metric"] == "perplexity" and m["steps"] == 3
    assert [h["step"] for h in m["curve"]] == [1, 2, 3]
    assert m["curve"][-1]["perplexity"] == pytest.approx(m["validation"]["perplexity"])
    assert "validation perplexity" in printed


# ------------------------------------------------------------------ review findings, pinned


def test_left_padding_tokenizer_strips_the_question_not_the_context(tmp_path):
    from datasets import Dataset

    tok = make_tokenizer(tmp_path / "tok", QA_WORDS)
    tok.padding_side = "left"  # the context goes first, the question second
    context = "  anna lives in rome . ben lives in oslo ."
    row = {
        "id": "l",
        "question": "  where lives ben ?",
        "context": context,
        "answers": {"text": ["oslo"], "answer_start": [context.index("oslo")]},
    }
    ex = Dataset.from_list([row])[:]
    tr = qa.prepare_train_features(ex, tok, 32, 4)
    ev = qa.prepare_eval_features(ex, tok, 32, 4)
    s, e = tr["start_positions"][0], tr["end_positions"][0]
    off = ev["offset_mapping"][0]
    assert context[off[s][0] : off[e][1]] == "oslo"
    cls = ev["cls_index"][0]
    assert tr["input_ids"][0][cls] == tok.cls_token_id and cls > 0  # pads come first
    # the no-answer score is read at [CLS], wherever the tokenizer put it
    n = len(off)
    start, end = np.full((1, n), -5.0), np.full((1, n), -5.0)
    start[0, s], end[0, e] = 1.0, 1.0
    start[0, cls], end[0, cls] = 3.0, 3.0
    feats = Dataset.from_dict({k: ev[k] for k in ("example_id", "offset_mapping", "cls_index")})
    assert qa.postprocess([row], feats, start, end, version_2=True) == {"l": ""}
    start[0, cls] = end[0, cls] = 0.5
    assert qa.postprocess([row], feats, start, end, version_2=True) == {"l": "oslo"}


def test_bad_settings_and_data_are_one_clear_error(tmp_path):
    bert_qa = make_task_model_dir(tmp_path / "qa", "question-answering")
    squad = make_squad(tmp_path / "s.json")
    prepare(None, str(bert_qa), str(squad), max_length=12, doc_stride=4)  # 5 new tokens a window
    with pytest.raises(DataError, match="has 4 tokens: with --max-length 12 and --doc-stride 5"):
        prepare(None, str(bert_qa), str(squad), max_length=12, doc_stride=5)
    mlm = make_task_model_dir(tmp_path / "mlm", "masked-lm")
    corpus = make_corpus(tmp_path / "c.txt")
    with pytest.raises(DataError, match="--doc-stride applies to question-answering"):
        prepare(None, str(mlm), str(corpus), doc_stride=8)
    with pytest.raises(DataError, match="--eval-stride applies to causal-lm"):
        prepare(None, str(mlm), str(corpus), stride=8)
    with pytest.raises(DataError, match="--eval-split applies to hub classification"):
        prepare(None, str(mlm), str(corpus), eval_split="validation_mismatched")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "question": "q", "context": "c", "answers": {"x": []}}))
    with pytest.raises(DataError, match="an 'answers' entry is not"):
        qa.read_squad_file(bad)
    neg = tmp_path / "neg.csv"
    neg.write_text("text,label\na,0\nb,-1\n")
    with pytest.raises(DataError, match="negative labels"):
        prepare("sequence-classification", str(mlm), str(neg))
    # a quoted header with a byte-order mark is still read for the task
    quoted = tmp_path / "q.csv"
    quoted.write_text('\ufeff"text","label"\n"anna",1\n"ben",0\n', encoding="utf-8")
    assert infer_task(str(mlm), str(quoted)) == "sequence-classification"
    # hub names: SQuAD's are question answering, any other labelled classification
    assert infer_task(str(mlm), "nyu-mll/glue:mnli") == "sequence-classification"
    assert infer_task(str(mlm), "squad_v2") == "question-answering"


def test_causal_lm_training_predicts_the_document_separators(tmp_path):
    from transformers import AutoTokenizer

    model_dir = make_task_model_dir(tmp_path / "m", "causal-lm", "gpt2")
    AutoTokenizer.from_pretrained(model_dir, pad_token="[SEP]").save_pretrained(model_dir)
    p = prepare(None, str(model_dir), str(make_corpus(tmp_path / "c.txt")), max_length=16)
    batch = p.collator([p.train[i] for i in range(len(p.train))])
    eos = p.tokenizer.eos_token_id
    assert eos == p.tokenizer.pad_token_id  # the case a padding-aware collator gets wrong
    assert (batch["labels"] == eos).any() and torch.equal(batch["labels"], batch["input_ids"])


def test_masked_lm_positions_do_not_depend_on_the_batch_size(tmp_path):
    from transformers import DataCollatorForLanguageModeling

    tok = make_tokenizer(tmp_path / "tok", QA_WORDS)
    ids = [[2, *range(5, 19), 3] for _ in range(10)]
    ds = lm.block_dataset(ids, labels=False)
    a = lm.mask_once(ds, DataCollatorForLanguageModeling(tok), batch_size=3)
    b = lm.mask_once(ds, DataCollatorForLanguageModeling(tok), batch_size=10)
    assert torch.equal(torch.cat([x["labels"] for x in a]), b[0]["labels"])


def test_squad_v2_ground_truths_that_normalise_to_nothing_are_dropped():
    m = qa.squad_metrics({"a": ""}, {"a": ["the", "."]})  # as the official v2 script
    assert m["exact_match"] == 100.0 and m["unanswerable"] == 1


def test_steps_to_reach_reads_the_metric_in_its_direction():
    from curvature.cli.train import steps_to_reach

    curve = [{"step": 1, "perplexity": 50.0}, {"step": 2, "perplexity": 20.0}]
    assert steps_to_reach(curve, 30.0, "perplexity", higher_is_better=False) == 2
    assert steps_to_reach(curve, 10.0, "perplexity", higher_is_better=False) is None


@pytest.mark.parametrize("task", ["question-answering", "sequence-classification", "masked-lm"])
def test_max_length_beyond_the_models_positions_is_clamped_with_one_warning(tmp_path, task):
    """The tiny models hold 64 positions; the default --max-length 128 used to fail inside the
    model (a tensor-size RuntimeError) at the first evaluation."""
    head = "masked-lm" if task == "masked-lm" else "question-answering"
    model_dir = make_task_model_dir(tmp_path / "m", head)  # a classifier: a new head on it
    if task == "question-answering":
        data = make_squad(tmp_path / "s.json", n_contexts=3)
    elif task == "masked-lm":
        data = make_corpus(tmp_path / "c.txt", n_docs=150)
    else:
        data = tmp_path / "d.csv"
        data.write_text("text,label\n" + "\n".join(
            f"{' '.join(['anna lives in paris'] * 40)},{'north' if i % 2 else 'south'}" for i in range(8)
        ) + "\n")  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"--max-length 128 is longer than the model's 64 positions"
    ):
        p = prepare(task, str(model_dir), str(data), max_length=128)
    ev = p.evaluate(p.model)  # would raise inside the model without the clamp
    assert all(math.isfinite(v) for k, v in ev.items() if isinstance(v, float))
