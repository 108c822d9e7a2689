"""``curvature export``: a saved model in ONNX Runtime, its int8 weights the saved 8-bit codes,
checked against PyTorch; bad input is one line and writes nothing."""

import json

import numpy as np
import pytest
import torch
from models import make_csv, make_model_dir, write_recipe

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("compressed_tensors")

from curvature.cli.main import main  # noqa: E402

RECIPE = """
modifiers:
  - !StructureModifier {neurons: 0.5, method: obs, num_calibration_batches: 4}
  - !GPTQModifier {bits: BITS, group_size: null, symmetric: SYM, num_calibration_batches: 4, embedding_bits: 8}
"""

QUANTIZE_ONLY = """
modifiers:
  - !GPTQModifier {bits: 8, group_size: null, symmetric: true, num_calibration_batches: 4}
"""


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir, data = make_model_dir(root / "model"), make_csv(root / "train.csv")
    outs = {}
    runs = (("true", "8", RECIPE), ("false", "4", RECIPE), ("plain", "8", QUANTIZE_ONLY))
    for sym, bits, text in runs:  # 4-bit codes are int8 codes too
        out = root / f"pruned-{sym}"
        text = text.replace("SYM", "true" if sym == "plain" else sym).replace("BITS", bits)
        argv = [
            "prune", write_recipe(root, text), "--model", str(model_dir),
            "--data", str(data), "--output", str(out), "--batch-size", "8", "--max-length", "32",
            "--no-progress", "--oneshot",
        ]  # fmt: skip
        assert main(argv) == 0
        outs[sym] = out
    return root, outs


@pytest.mark.parametrize("sym", ["true", "false", "plain"])
def test_int8_export_holds_the_saved_codes_and_predicts_like_pytorch(pruned, sym, capsys):
    import onnx
    from onnx import numpy_helper

    from curvature.integrations.runtime import load_saved, saved_codes

    root, outs = pruned
    out = root / f"onnx-{sym}"
    rc = main(["export", str(outs[sym]), "--output", str(out), "--int8", "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "onnxruntime model" in printed and "batch 16 x 32, 1 threads" in printed
    info = json.loads((out / "export.json").read_text())
    codes = saved_codes(outs[sym])
    codes = dict(codes)
    codes.pop("bert.embeddings.word_embeddings", None)
    assert len(codes) == 14  # every linear layer; the runtime keeps the one-token ones in float
    assert info["float_in_runtime"] == ["bert.pooler.dense", "classifier"]
    assert sorted(info["saved_codes"] + info["float_in_runtime"]) == sorted(codes)
    assert info["rounded_by_runtime"] == []
    assert info["check"]["same_prediction"] == 1.0
    assert info["check"]["max_abs_difference"] < 0.05 * (1 + info["check"]["max_abs_logit"])
    # the runtime's int8 weights are the saved codes, bit for bit
    model = load_saved(outs[sym])
    inits = {
        i.name: numpy_helper.to_array(i) for i in onnx.load(out / "model.onnx").graph.initializer
    }
    quantized = [v for k, v in inits.items() if k.endswith("_quantized") and v.ndim == 2]
    layer = "bert.encoder.layer.1.intermediate.dense"
    c, scale, zero = codes[layer]
    assert any(np.array_equal(v, c.T.numpy()) for v in quantized)
    w = model.get_submodule(layer).weight.detach()
    torch.testing.assert_close(w, (c.float() - zero.float()[:, None]) * scale[:, None])
    assert all(b["onnxruntime_ms"] > 0 for b in info["latency"])
    if sym != "plain":  # the word embeddings as int8 codes and per-token scales, no float table
        assert info["embedding_codes"] == "bert.embeddings.word_embeddings"
        emb = model.bert.embeddings.word_embeddings.weight.detach().numpy()
        assert not any(v.shape == emb.shape and v.dtype == np.float32 for v in inits.values())
        table = next(v for k, v in inits.items() if k.endswith("_codes"))
        e_codes, e_scale, e_zero = saved_codes(outs[sym])["bert.embeddings.word_embeddings"]
        assert np.array_equal(table, e_codes.numpy())
        np.testing.assert_allclose(
            emb,
            (e_codes.float() - e_zero.float()[:, None]).numpy() * e_scale.numpy()[:, None],
            rtol=1e-6,
            atol=1e-9,
        )


def test_float_export_is_within_tolerance(pruned):
    from curvature.integrations.runtime import export

    root, outs = pruned
    info = export(outs["true"], root / "float", threads=1, measure=False)
    assert info["check"]["max_abs_difference"] < 1e-4 * (1 + info["check"]["max_abs_logit"])
    assert "saved_codes" not in info and "latency" not in info


def test_export_bad_input_is_one_line(pruned, tmp_path, capsys, monkeypatch):
    root, outs = pruned
    cases = [
        (["export", str(tmp_path / "nothing"), "--output", str(tmp_path / "a")], "no such folder"),
        (["export", str(tmp_path), "--output", str(tmp_path / "b")], "no config.json"),
        (["export", str(outs["true"]), "--output", str(tmp_path / "c"), "--threads", "0"],
         "--threads must be >= 1"),
        (["export", str(outs["true"])], "--output"),
    ]  # fmt: skip
    for argv, message in cases:
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)
        assert "Traceback" not in err[0]
    import builtins

    real = builtins.__import__

    def no_runtime(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime", name="onnxruntime")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_runtime)
    rc = main(["export", str(outs["true"]), "--output", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs onnxruntime" in err[0] and "[quant]" in err[0]
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.partial-*"))


def test_an_export_that_ignores_padding_is_refused(tmp_path, monkeypatch):
    """The check batch has padded rows: an exported graph that reads the attention mask but
    treats every position as a token (planted here) differs from PyTorch there and is not kept."""
    from curvature.integrations import runtime

    real = runtime._export_float

    class IgnoresPadding(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def forward(self, input_ids, attention_mask, token_type_ids):
            # still an input of the graph, but always 1
            mask = attention_mask.clamp(min=1)
            return self.model(
                input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids
            )

    from transformers import AutoModelForSequenceClassification

    # logits of order 10 (the tiny model's are 0.01, where any error is within tolerance)
    model = AutoModelForSequenceClassification.from_pretrained(make_model_dir(tmp_path / "m"))
    with torch.no_grad():
        model.classifier.weight.mul_(1e3)
    model.save_pretrained(tmp_path / "loud")
    good = runtime.export(tmp_path / "loud", tmp_path / "good", threads=1, measure=False)
    assert good["check"]["max_abs_logit"] > 1.0  # the check can see a padding error
    monkeypatch.setattr(runtime, "_export_float", lambda m, b, p: real(IgnoresPadding(m), b, p))
    with pytest.raises(ValueError, match="the export is wrong and was not kept"):
        runtime.export(tmp_path / "loud", tmp_path / "bad", threads=1, measure=False)


def test_equal_weights_in_two_layers_are_never_given_the_other_layers_codes(tmp_path):
    """Two layers with equal float weights but different saved codes (another scale): the
    runtime's weight cannot be told apart, so neither gets saved codes (the runtime rounds it)
    rather than one of them getting the other's."""
    from curvature.integrations import runtime

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8, bias=False)
            self.b = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

        def get_input_embeddings(self):  # none: only the linear layers' codes are in play
            return None

    torch.manual_seed(0)
    model = Two().eval()
    with torch.no_grad():
        model.b.weight.copy_(model.a.weight)
    w = model.a.weight.detach()
    scale = w.abs().amax(1) / 127
    zero = torch.zeros(8, dtype=torch.int8)
    codes = {
        "a": (torch.round(w / scale[:, None]).to(torch.int8), scale, zero),
        "b": (torch.round(w / (2 * scale[:, None])).to(torch.int8), 2 * scale, zero),
    }
    runtime._export_float(model, {"x": torch.randn(2, 3, 8)}, tmp_path / "float.onnx")
    info = runtime._int8(model, tmp_path / "float.onnx", tmp_path / "int8.onnx", codes)
    assert info["saved_codes"] == [] and info["equal_weights_left_to_runtime"] >= 1
