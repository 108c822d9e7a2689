"""Structured pruning from recipes and the command line, end to end on the tiny model and task."""

import json

import pytest
import torch
from models import make_csv, make_model_dir, write_recipe

from curvature.cli.main import main
from curvature.integrations.structured import load_structured

STRUCTURE = """
num_epochs: EPOCHS
modifiers:
  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: eval(num_epochs)}
  - !LearningRateFunctionModifier {lr_func: linear, init_lr: 1e-3, final_lr: 1e-4, start_epoch: 0.0, end_epoch: eval(num_epochs)}
  - !StructureModifier
    TARGET
    method: METHOD
    num_calibration_batches: 4
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_model_dir(root / "model"), make_csv(root / "train.csv")


def _prune(assets, tmp_path, text, *extra, name="out"):
    model_dir, data = assets
    out = tmp_path / name
    argv = ["prune", write_recipe(tmp_path, text), "--model", str(model_dir), "--data", str(data)]
    rc = main(
        [
            *argv,
            "--output",
            str(out),
            "--batch-size",
            "8",
            "--max-length",
            "32",
            "--no-progress",
            *extra,
        ]
    )
    return rc, out


def _recipe(target="heads: 0.5\n    neurons: 0.5", method="obs", epochs="0.0", extra=""):
    text = STRUCTURE.replace("TARGET", target).replace("METHOD", method)
    return text.replace("EPOCHS", epochs) + extra


@pytest.mark.parametrize(
    "method", ["obs", "magnitude", "activation", "fluctuation", "fisher", "taylor"]
)
def test_oneshot_structured_prune_writes_a_smaller_model_that_loads_back(assets, tmp_path, method):
    rc, out = _prune(assets, tmp_path, _recipe(method=method), "--oneshot")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    s = m["structured"]
    assert s["method"] == method and s["sizes"] == {"heads": [1, 1], "neurons": [16, 16]}
    assert s["params_after"] < s["params_before"]
    assert m["dense"]["examples"] == m["pruned"]["examples"]
    assert {b["batch_size"] for b in s["latency"]["batches"]} == {16, 1}
    info = json.loads((out / "structured.json").read_text())
    assert info["sizes"] == s["sizes"] and info["plain_transformers"] is False  # BERT heads
    model = load_structured(out)
    assert sum(p.numel() for p in model.parameters()) == s["params_after"]
    assert m["model_bytes"] == (out / "model.safetensors").stat().st_size


def test_neurons_only_load_in_plain_transformers(assets, tmp_path):
    from transformers import AutoModelForSequenceClassification

    text = _recipe(target="neurons: 0.25\n    latency_batch_size: 4")
    rc, out = _prune(assets, tmp_path, text, "--oneshot")
    assert rc == 0
    latency = json.loads((out / "metrics.json").read_text())["structured"]["latency"]
    assert [b["batch_size"] for b in latency["batches"]] == [4, 1]
    assert json.loads((out / "structured.json").read_text())["plain_transformers"] is True
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.intermediate_size == 24


def test_structured_then_unstructured_and_distilled_training(assets, tmp_path):
    extra = """  - !DistillationModifier {hardness: 0.5, temperature: 2.0, start_epoch: 0.0, end_epoch: eval(num_epochs), teacher: self}
  - !OBSPruningModifier
    params: ["re:bert.encoder.layer.*.(intermediate|output).dense.weight"]
    init_sparsity: 0.3
    final_sparsity: 0.5
    start_epoch: 1.0
    end_epoch: 1.0
    update_frequency: 0.5
    num_grads: 8
    damp: 1.0e-6
    fisher_block_size: 8
    grad_sampler_kwargs: {batch_size: 4}
"""
    rc, out = _prune(assets, tmp_path, _recipe(epochs="2.0", extra=extra))
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["structured"]["sizes"]["neurons"] == [16, 16]
    assert m["sparsity"] == pytest.approx(0.5, abs=1e-3)
    model = load_structured(out)
    ws = [p for n, p in model.named_parameters() if n in m["param_sparsity"]]
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape == (16, 16)
    zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    assert len(ws) == 6 and zeros == pytest.approx(0.5, abs=1e-3)  # the masks survived training


@pytest.mark.parametrize(
    "target,message",
    [
        ("speedup: 500", "speedup 500 cannot be met: one head and 2 neurons per block"),
        ("heads: 0.5\n    speedup: 2", "not both"),
        ("head: 0.5", "head"),
        ("heads: 1.0", "heads"),
    ],
)
def test_bad_structured_recipes_are_one_line_and_write_nothing(
    assets, tmp_path, capsys, target, message
):
    rc, out = _prune(assets, tmp_path, _recipe(target=target), "--oneshot")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_method_without_damp_refuses_it(assets, tmp_path, capsys):
    rc, _ = _prune(
        assets, tmp_path, _recipe(method="magnitude", extra="    damp: 0.1\n"), "--oneshot"
    )
    assert rc == 2 and "has no damp" in capsys.readouterr().err


def test_whole_modules_removed_then_quantized(assets, tmp_path):
    """The layers a removed module leaves without weights are not quantized (they have none):
    the others are, and the packed model loads back."""
    extra = "  - !GPTQModifier {bits: 4, group_size: 8, num_calibration_batches: 4}\n"
    target = "attention_modules: 1\n    feed_forward_modules: 1"
    rc, out = _prune(assets, tmp_path, _recipe(target=target, extra=extra), "--oneshot")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    # 14 linear layers: the removed attention's 3 producers are gone, the 3 emptied layers
    # (its output projection, the removed feed-forward's two) are skipped
    assert m["quantized"]["layers"] == 8
    model = load_structured(out)
    assert sum(p.numel() for p in model.parameters()) == m["structured"]["params_after"]


def test_structured_then_quantized_oneshot(assets, tmp_path):
    extra = "  - !GPTQModifier {bits: 4, group_size: 8, num_calibration_batches: 4}\n"
    rc, out = _prune(assets, tmp_path, _recipe(target="neurons: 0.5", extra=extra), "--oneshot")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    q = m["quantized"]
    assert (
        q["layers"] == 14 and q["bits"] == 4 and q["bits_per_weight"] == pytest.approx(4 + 32 / 8)
    )
    saved = q["saved"]  # asymmetric: one byte per code, in the library's format
    assert saved["format"] == "int-quantized" and saved["layers"] == 14
    assert saved["bytes"] == m["model_bytes"] == (out / "model.safetensors").stat().st_size
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    assert config["intermediate_size"] == 16
    model = load_structured(out)
    w = model.bert.encoder.layer[0].intermediate.dense.weight.detach().double()
    assert w.shape == (16, 16)
    for group in w.reshape(-1, 8):  # each group of 8 columns lies on one evenly spaced grid
        levels = torch.unique(group)
        if len(levels) < 2:
            continue
        span = (levels - levels[0]) / torch.diff(levels).min()  # the step divides every distance
        assert any(torch.allclose(span * k, (span * k).round(), atol=1e-3) for k in range(1, 5)), (
            group
        )


def test_symmetric_grids_are_saved_packed_and_load_in_plain_transformers(assets, tmp_path):
    from transformers import AutoModelForSequenceClassification

    extra = "  - !GPTQModifier {bits: 4, group_size: 8, symmetric: true}\n"
    rc, out = _prune(assets, tmp_path, _recipe(target="neurons: 0.5", extra=extra), "--oneshot")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["quantized"]["saved"]["format"] == "pack-quantized"
    model = AutoModelForSequenceClassification.from_pretrained(out)  # neurons only: plain
    again = load_structured(out)
    batch = torch.randint(5, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch).logits, again(input_ids=batch).logits)


def test_a_group_the_packed_format_cannot_store_is_refused_before_any_work(
    assets, tmp_path, capsys
):
    extra = "  - !GPTQModifier {bits: 4, group_size: 12}\n"
    rc, out = _prune(assets, tmp_path, _recipe(target="neurons: 0.5", extra=extra), "--oneshot")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and not out.exists()
    assert "GPTQModifier: group 12 does not divide the 16 input columns of bert." in err[0]


def test_a_group_the_structured_sizes_break_is_refused_before_training(
    assets, tmp_path, capsys, monkeypatch
):
    """Group 16 divides the dense model's 16 and 32 columns but not the 24 left by removing a
    quarter of the neurons: refused right after the structures go, before the epoch of training
    (which would fail this test) and before anything is written."""
    from curvature.integrations import hf

    def no_training(*a, **k):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(hf.RecipeTrainer, "train", no_training)
    extra = "  - !GPTQModifier {bits: 4, group_size: 16}\n"
    rc, out = _prune(assets, tmp_path, _recipe(target="neurons: 0.25", epochs="1.0", extra=extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and not out.exists(), err
    assert "group 16 does not divide the 24 input columns of bert.encoder.layer.0.output" in err[0]


def test_float_weights_without_a_quantizer_is_refused(assets, tmp_path, capsys):
    rc, out = _prune(assets, tmp_path, _recipe(), "--oneshot", "--float-weights")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--float-weights: the recipe quantizes nothing" in err[0]
    assert not out.exists()


def test_float_weights_saves_what_the_packed_format_cannot_store(assets, tmp_path):
    extra = "  - !GPTQModifier {bits: 4, group_size: 12}\n"
    recipe = _recipe(target="neurons: 0.5", extra=extra)
    rc, out = _prune(assets, tmp_path, recipe, "--oneshot", "--float-weights")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "saved" not in m["quantized"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    w = load_structured(out).bert.encoder.layer[0].output.dense.weight.detach()
    assert w.dtype == torch.float32 and w.shape == (16, 16)
    assert len(torch.unique(w[0, :12])) <= 16  # a 12-column group on one 4-bit grid


def test_pruning_and_quantizing_in_one_sweep_keeps_n_m_and_the_grid(assets, tmp_path, capsys):
    extra = "  - !GPTQModifier {bits: 4, group_size: 8, symmetric: true, mask_type: '2:4'}\n"
    rc, out = _prune(assets, tmp_path, _recipe(target="neurons: 0.5", extra=extra), "--oneshot")
    assert rc == 0
    q = json.loads((out / "metrics.json").read_text())["quantized"]
    assert q["mask_type"] == "2:4" and 0.5 <= q["zeros"] < 0.55  # kept weights may round to 0
    assert q["pruned"] == pytest.approx(0.5)
    assert json.loads((out / "metrics.json").read_text())["sparsity"] == pytest.approx(0.5)
    model = load_structured(out)
    w = model.bert.encoder.layer[1].output.dense.weight.detach()
    assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all()
    for group in w.reshape(-1, 8):
        assert len(torch.unique(group)) <= 16
    bad = "  - !GPTQModifier {method: rtn, bits: 4, sparsity: 0.5}\n"
    rc, out = _prune(assets, tmp_path, _recipe(extra=bad), "--oneshot", name="bad")
    assert rc == 2 and "needs method gptq" in capsys.readouterr().err


def test_a_group_wider_than_a_layer_is_refused_before_any_work(assets, tmp_path, capsys):
    extra = "  - !GPTQModifier {bits: 4, group_size: 64}\n"
    rc, out = _prune(assets, tmp_path, _recipe(target="neurons: 0.5", extra=extra), "--oneshot")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and not out.exists()
    assert (
        "GPTQModifier: group 64 is larger than the 16 input columns of bert.encoder.layer.0"
        in err[0]
    )


def test_a_speedup_is_planned_from_the_table_and_the_error_curves(assets, tmp_path, monkeypatch):
    """With a deterministic stand-in for the clock (time = the model's parameter count, which adds
    up over modules exactly), the plan's predicted speed-up is met and equals the measured one."""
    from curvature.integrations import latency

    monkeypatch.setattr(
        latency,
        "measure_model",
        lambda model, batch, reps=7: float(sum(p.numel() for p in model.parameters())),
    )
    rc, out = _prune(assets, tmp_path, _recipe(target="speedup: 1.05"), "--oneshot")
    assert rc == 0
    s = json.loads((out / "metrics.json").read_text())["structured"]
    assert s["predicted_speedup"] >= 1.05
    table = s["latency_table"]
    assert set(table["heads"]) == {"1", "2"} and "32" in table["neurons"]
    measured = s["latency"]["batches"][0]["speedup"]
    assert measured == pytest.approx(s["predicted_speedup"], rel=1e-9)
    assert s["params_after"] <= s["params_before"] / 1.05


def test_a_per_block_speedup_plan_is_met_and_loads_back(assets, tmp_path, monkeypatch):
    """uniform: false: sizes chosen per block; with the parameter-count clock the prediction is
    exact, so the measured speed-up equals it; the model loads back through load_structured."""
    from curvature.integrations import latency

    monkeypatch.setattr(
        latency,
        "measure_model",
        lambda model, batch, reps=7: float(sum(p.numel() for p in model.parameters())),
    )
    target = "speedup: 1.05\n    uniform: false"
    rc, out = _prune(assets, tmp_path, _recipe(target=target), "--oneshot")
    assert rc == 0
    s = json.loads((out / "metrics.json").read_text())["structured"]
    assert s["predicted_speedup"] >= 1.05
    assert s["latency"]["batches"][0]["speedup"] == pytest.approx(s["predicted_speedup"], 1e-9)
    assert s["sizes"] == s["planned_sizes"]
    assert load_structured(out) is not None
    bad = _recipe(target="heads: 0.5\n    uniform: false")
    rc, out = _prune(assets, tmp_path, bad, "--oneshot", name="bad")
    assert rc == 2 and not out.exists()


def test_structures_then_distilled_training_from_the_dense_teacher(assets, tmp_path):
    # the recipe prunes nothing else: --teacher self is the dense model before the structures go
    extra = "  - !DistillationModifier {hardness: 1.0, temperature: 2.0, start_epoch: 0.0, end_epoch: eval(num_epochs), teacher: self}\n"
    rc, out = _prune(assets, tmp_path, _recipe(epochs="1.0", extra=extra))
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["structured"]["sizes"]["heads"] == [1, 1] and m["steps"] > 0
    # the model right after the removal is evaluated before training recovers it: the same
    # numbers as the one-shot run of the same removal, with its paired difference to the dense
    rc, oneshot = _prune(assets, tmp_path, _recipe(epochs="1.0", extra=extra), "--oneshot",
                         name="oneshot")  # fmt: skip
    assert rc == 0
    o = json.loads((oneshot / "metrics.json").read_text())
    before = m["before_training"]
    assert before["loss"] == pytest.approx(o["pruned"]["loss"], abs=1e-6)
    assert before["accuracy"] == o["pruned"]["accuracy"]
    assert before["accuracy_delta"] == pytest.approx(o["pruned"]["accuracy_delta"])
    assert before["loss"] != pytest.approx(m["pruned"]["loss"], abs=1e-6)
    assert "before_training" not in o
    assert "structures removed, before training" in (out / "report.md").read_text()


def test_training_then_quantizing_keeps_the_dense_reference(assets, tmp_path):
    text = """
num_epochs: 1.0
modifiers:
  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: eval(num_epochs)}
  - !GPTQModifier {bits: 8, group_size: 8, num_calibration_batches: 2}
"""
    rc, out = _prune(assets, tmp_path, text)
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dense"] is not None and m["quantized"]["bits"] == 8
    assert "accuracy_delta" in m["pruned"]


GRADUAL = """    start_epoch: 0.0
    end_epoch: 1.5
    update_frequency: 0.5
"""


def test_gradual_removal_shrinks_step_by_step_during_distilled_training(assets, tmp_path):
    """Heads and neurons go at 0, 0.5, 1.0 and 1.5 epochs along the cubic curve (the optimizer
    keeps training the smaller matrices); the end sizes are the one-shot sizes, and the saved
    model loads back with the parameters the report counts."""
    extra = "  - !DistillationModifier {hardness: 0.5, temperature: 2.0, start_epoch: 0.0, end_epoch: eval(num_epochs), teacher: self}\n"
    text = _recipe(target="heads: 0.5\n    neurons: 0.75\n" + GRADUAL, epochs="2.0", extra=extra)
    rc, out = _prune(assets, tmp_path, text)
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    s = m["structured"]
    assert [p["epoch"] for p in s["schedule"]] == [0.0, 0.5, 1.0, 1.5]
    # cubic 1-(1-x)^3 of 24 neurons: 0, 16.9, 23.1, 24 removed; the first step removes nothing
    assert [h["epoch"] for h in s["steps"]] == [0.5, 1.0, 1.5]
    assert [h["sizes"]["neurons"] for h in s["steps"]] == [[15, 15], [9, 9], [8, 8]]
    assert s["sizes"] == {"heads": [1, 1], "neurons": [8, 8]}
    assert s["params_after"] < s["params_before"]
    assert m["steps"] > 0 and m["pruned"]["examples"] == m["dense"]["examples"]
    model = load_structured(out)
    assert sum(p.numel() for p in model.parameters()) == s["params_after"]
    assert model.bert.encoder.layer[1].intermediate.dense.weight.shape == (8, 16)


@pytest.mark.parametrize("method", ["magnitude", "activation", "fluctuation", "fisher", "taylor"])
def test_every_chooser_removes_gradually(assets, tmp_path, method):
    """The choosers other than obs at each gradual step (the gradient ones take their gradients
    on the model as trained so far): the same schedule of sizes, and the model loads back."""
    text = _recipe(target="heads: 0.5\n    neurons: 0.75\n" + GRADUAL, method=method, epochs="2.0")
    rc, out = _prune(assets, tmp_path, text)
    assert rc == 0
    s = json.loads((out / "metrics.json").read_text())["structured"]
    assert s["method"] == method
    assert [h["sizes"]["neurons"] for h in s["steps"]] == [[15, 15], [9, 9], [8, 8]]
    model = load_structured(out)
    assert sum(p.numel() for p in model.parameters()) == s["params_after"]


@pytest.mark.parametrize(
    "extra,flags,message",
    [
        ("  - !OptimizerModifier {name: mkor}\n", (), "optimizer mkor keeps curvature"),
        ("", ("--resume",), "--resume: a run that removes structures gradually cannot be"),
        ("", ("--checkpoint-every", "2"), "--checkpoint-every: a run that removes structures"),
        (
            "  - !MagnitudePruningModifier {params: __ALL_PRUNABLE__, init_sparsity: 0.1, "
            "final_sparsity: 0.5, start_epoch: 1.0, end_epoch: 2.0, update_frequency: 0.5}\n",
            (),
            "before the gradual structure removal ends",
        ),
    ],
)
def test_what_cannot_follow_shrinking_matrices_is_refused_in_one_line(
    assets, tmp_path, capsys, extra, flags, message
):
    text = _recipe(target="neurons: 0.5\n" + GRADUAL, epochs="2.0", extra=extra)
    rc, out = _prune(assets, tmp_path, text, *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "target,message",
    [
        ("neurons: 0.5\n    start_epoch: 0.0\n    end_epoch: 1.0\n", "needs update_frequency"),
        ("neurons: 0.5\n    update_frequency: 0.5\n", "set a gradual removal"),
    ],
)
def test_gradual_settings_that_do_not_fit_are_one_line(assets, tmp_path, capsys, target, message):
    rc, _ = _prune(assets, tmp_path, _recipe(target=target, epochs="2.0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_oneshot_runs_a_gradual_removal_at_once(assets, tmp_path):
    rc, out = _prune(assets, tmp_path, _recipe(target="neurons: 0.75\n" + GRADUAL), "--oneshot")
    assert rc == 0
    s = json.loads((out / "metrics.json").read_text())["structured"]
    assert s["sizes"]["neurons"] == [8, 8] and "steps" not in s


@pytest.mark.parametrize("layer_method", ["loss", "angular"])
def test_whole_blocks_go_first_and_the_model_loads_in_plain_transformers(
    assets, tmp_path, layer_method
):
    from transformers import AutoModelForSequenceClassification

    target = f"neurons: 0.5\n    layers: 1\n    layer_method: {layer_method}"
    rc, out = _prune(assets, tmp_path, _recipe(target=target), "--oneshot")
    assert rc == 0
    s = json.loads((out / "metrics.json").read_text())["structured"]
    assert s["layers"]["blocks"] == 1 and len(s["layers"]["removed"]) == 1
    assert s["sizes"] == {"neurons": [16]}  # the one block left, half its neurons
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 16
    assert sum(p.numel() for p in model.parameters()) == s["params_after"]


def test_whole_modules_go_before_heads_and_neurons_and_the_model_loads_back(assets, tmp_path):
    """One block's attention and one block's feed-forward removed whole (chosen by the measured
    calibration loss), then half the neurons of the feed-forwards left: the saved model loads
    through load_structured and gives the pruned model's validation loss."""
    target = "neurons: 0.5\n    attention_modules: 1\n    feed_forward_modules: 1"
    rc, out = _prune(assets, tmp_path, _recipe(target=target), "--oneshot")
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    s = m["structured"]
    assert len(s["modules"]["attention"]["removed"]) == 1
    (ff,) = s["modules"]["feed_forward"]["removed"]
    assert s["sizes"] == {"neurons": [16]}  # half of the one feed-forward left
    saved = json.loads((out / "structured.json").read_text())
    assert not saved["plain_transformers"] and len(saved["modules"]) == 1
    model = load_structured(out)
    assert sum(p.numel() for p in model.parameters()) == s["params_after"]
    layer = model.bert.encoder.layer[ff]
    assert layer.intermediate.dense.weight.shape[0] == 0 and layer.output.dense.in_features == 0
    (name,) = saved["modules"]
    assert type(model.get_submodule(name)).__name__ == "Silent"


@pytest.mark.parametrize(
    "target,message",
    [
        ("layers: 2", "2 of 2 blocks cannot be removed"),
        ("layers: 1\n    speedup: 2", "remove speedup"),
        ("neurons: 0.5\n    layer_method: angular", "layers is 0"),
        ("attention_modules: 3", "attention_modules: 3 cannot be removed: the model has 2"),
        ("feed_forward_modules: 1\n    speedup: 2", "feed_forward_modules (whole modules)"),
        ("attention_module: 1", "attention_modules"),
    ],
)
def test_bad_block_removals_are_one_line(assets, tmp_path, capsys, target, message):
    rc, out = _prune(assets, tmp_path, _recipe(target=target), "--oneshot")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_gradual_removal_reaches_a_per_block_speedup_plan(assets, tmp_path, monkeypatch):
    """The plan (sizes per block, from the parameter-count clock) is made before training; the
    gradual steps end at exactly its sizes, and the measured speed-up is the predicted one."""
    from curvature.integrations import latency

    monkeypatch.setattr(
        latency,
        "measure_model",
        lambda model, batch, reps=7: float(sum(p.numel() for p in model.parameters())),
    )
    target = "speedup: 1.2\n    uniform: false\n" + GRADUAL
    rc, out = _prune(assets, tmp_path, _recipe(target=target, epochs="2.0"))
    assert rc == 0
    s = json.loads((out / "metrics.json").read_text())["structured"]
    assert s["sizes"] == s["planned_sizes"] and len(s["steps"]) >= 2
    assert s["latency"]["batches"][0]["speedup"] == pytest.approx(s["predicted_speedup"], 1e-9)
    assert load_structured(out) is not None
