import csv
import json

import pytest
import torch
from models import make_csv, make_model_dir

from curvature.cli.main import main
from curvature.cli.sweep import SweepConfig, SweepError, load_points, run_sweep
from curvature.integrations.compress import load_compressed, save_compressed


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-assets")
    return make_model_dir(root / "model"), make_csv(root / "train.csv")


def config(assets, out, **kw):
    model_dir, data = assets
    base = dict(
        output=str(out),
        model=str(model_dir),
        data=str(data),
        methods=["obs", "magnitude"],
        sparsities=[0.5, 0.8],
        finetune_epochs=1.0,
        batch_size=8,
        lr=1e-3,
        gradients=8,
        block_size=8,
        fisher_damping=1e-6,
        progress=False,
        params=["re:bert.encoder"],
    )
    base.update(kw)
    if not any(m.startswith(("obs", "mfac")) for m in base["methods"]):
        # settings no method has are refused: a magnitude sweep is given none of OBS's, and
        # under a recipe no block size (the magnitude modifier's blocks are the mask's)
        for k in ("gradients", "fisher_damping") + (("block_size",) if base.get("recipe") else ()):
            if k not in kw:
                base.pop(k)
    return SweepConfig(**base)


def test_sweep_writes_consistent_outputs_and_resumes(assets, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    points = run_sweep(config(assets, out))
    assert len(points) == 5  # dense + 2 methods x 2 sparsities
    rows = list(csv.DictReader(open(out / "results.csv")))
    data = json.loads((out / "results.json").read_text())
    assert len(rows) == len(data) == 5
    for r, d in zip(rows, data):
        assert r["method"] == d["method"] and float(r["accuracy"]) == pytest.approx(d["accuracy"])
    for d in data:
        if d["method"] != "dense":
            assert d["sparsity"] == pytest.approx(d["target_sparsity"], abs=1e-3)
            assert d["compressed_bytes"] < d["dense_bytes"]
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert "| obs | unstructured | oneshot | 0.80 |" in (out / "results.md").read_text()

    # Interrupted during the last point: its line is cut; a rerun redoes that point only.
    lines = (out / "points.jsonl").read_text().splitlines()
    (out / "points.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    calls = []
    import curvature.cli.sweep as sw

    real = sw._run_point
    monkeypatch.setattr(sw, "_run_point", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    run_sweep(config(assets, out))
    assert calls == [("magnitude", 0.8)]
    assert len(load_points(out)) == 5
    with pytest.raises(SweepError, match="different seed"):
        run_sweep(config(assets, out, seed=3))


def test_sweep_seeds_intervals_pies_and_report(assets, tmp_path, capsys):
    """Two calibration seeds per point: the table's mean, spread and intervals come from the saved
    predictions, PIEs and per-class numbers equal a recount from those files, and the report
    holds every table and plot."""
    import numpy as np

    from curvature.cli.report import render_folder
    from curvature.tasks import stats

    out = tmp_path / "sweep"
    cfg = config(assets, out, methods=["obs", "magnitude"], sparsities=[0.8], seeds=2, speed_reps=1)
    points = run_sweep(cfg)
    # magnitude reads no data: one run stands for every seed
    assert [(p["method"], p.get("seed")) for p in points] == [
        ("dense", None), ("obs", 0), ("obs", 1), ("magnitude", 0)
    ]  # fmt: skip
    preds = sorted(f.name for f in (out / "predictions").iterdir())
    assert preds == [
        "dense.csv", "labels.json", "magnitude_unstructured_oneshot_0.8_seed0.csv",
        "obs_unstructured_oneshot_0.8_seed0.csv", "obs_unstructured_oneshot_0.8_seed1.csv",
        "texts.json",
    ]  # fmt: skip
    # the two seeds calibrate on different batches, so they prune differently
    seeds = [p for p in points if p["method"] == "obs"]
    u0 = stats.read_units(out / "predictions" / "obs_unstructured_oneshot_0.8_seed0.csv")
    u1 = stats.read_units(out / "predictions" / "obs_unstructured_oneshot_0.8_seed1.csv")
    dense = stats.read_units(out / "predictions" / "dense.csv")
    assert u0["prediction"].tolist() == [int(x) for x in u0["prediction"]]
    assert float(u0["correct"].mean()) == pytest.approx(seeds[0]["accuracy"])
    assert float(u1["correct"].mean()) == pytest.approx(seeds[1]["accuracy"])
    assert not np.array_equal(u0["confidence"], u1["confidence"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3
    assert next(r for r in rows if r["method"] == "magnitude")["seeds"] == "1"
    obs = next(r for r in rows if r["method"] == "obs")
    for col in ("accuracy_ci_low", "accuracy_ci_high", "accuracy_std", "accuracy_delta",
                "accuracy_delta_ci_low", "accuracy_delta_ci_high", "ece", "pies", "params_kept",
                "latency_ms_dense", "latency_ms_csr", "throughput_dense", "speed_batch"):  # fmt: skip
        assert obs[col] != "", col
    acc = (seeds[0]["accuracy"] + seeds[1]["accuracy"]) / 2
    assert float(obs["accuracy"]) == pytest.approx(acc)
    assert float(obs["accuracy_ci_low"]) <= acc <= float(obs["accuracy_ci_high"])
    assert obs["seeds"] == "2"
    # PIEs: the modal prediction over the two seeds (ties to the smaller label) against dense
    modal = np.minimum(u0["prediction"], u1["prediction"])
    modal[u0["prediction"] == u1["prediction"]] = u0["prediction"][
        u0["prediction"] == u1["prediction"]
    ]
    expected = sorted(int(i) for i in np.nonzero(modal != dense["prediction"])[0])
    pies = list(csv.DictReader(open(out / "pies.csv")))
    assert sorted(int(r["id"]) for r in pies) == expected
    assert int(obs["pies"]) == len(expected)
    # the report: every table and plot, one self-contained page
    page = (out / "report.html").read_text()
    assert 'src="http' not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 3
    assert "What pruning forgets" in page and "Per-class accuracy" in page
    md = render_folder(out)
    assert md == out / "report.md" and "95%" in md.read_text()
    assert main(["report", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out


def test_sweep_validation_and_report_cli(assets, tmp_path, capsys):
    with pytest.raises(SweepError, match="--methods: unknown \\['random'\\]"):
        config(assets, tmp_path / "x", methods=["random"]).validate()
    with pytest.raises(SweepError, match="outside \\[0, 1\\)"):
        config(assets, tmp_path / "x", sparsities=[1.2]).validate()
    assert main(["sweep", "--output", str(tmp_path / "y"), "--sparsities", "0.5,abc"]) == 2
    assert "expects a comma list of numbers" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert main(["report", str(tmp_path)]) == 2
    assert "holds neither a sweep (points.jsonl) nor a prune run" in capsys.readouterr().err


def test_compressed_round_trip_is_exact(assets, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_dir, _ = assets
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape, generator=gen) > 0.9)
    sizes = save_compressed(model, tmp_path / "c")
    assert sizes["compressed_bytes"] < 0.5 * sizes["dense_bytes"]
    back = load_compressed(tmp_path / "c")
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randint(5, 17, (3, 7))
    assert torch.equal(model(input_ids=x).logits, back(input_ids=x).logits)


def test_nothing_is_written_before_the_inputs_load(assets, tmp_path, capsys):
    out = tmp_path / "s"
    model_dir, data = assets
    argv = ["sweep", "--model", str(model_dir), "--output", str(out), "--no-progress"]
    assert main([*argv, "--data", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "change,name",
    [
        ({"gradients": 16}, "gradients"),
        ({"block_size": 16}, "block_size"),
        ({"fisher_damping": 1e-4}, "fisher_damping"),
        ({"params": ["re:bert.encoder.layer.0"]}, "params"),
        ({"recomputations": 2}, "recomputations"),
    ],
)
def test_a_changed_setting_is_refused_not_mixed_into_the_table(assets, tmp_path, change, name):
    out = tmp_path / "sweep"
    methods = ["magnitude"] if name in ("block_size", "params") else ["obs"]
    run_sweep(config(assets, out, methods=methods, sparsities=[0.5]))
    with pytest.raises(SweepError, match=f"different {name} "):
        run_sweep(config(assets, out, methods=methods, sparsities=[0.5], **change))


def test_a_setting_no_method_has_is_refused_and_one_some_lack_is_said(assets, tmp_path, capsys):
    """--fisher-damping for a magnitude sweep would change nothing: refused with one line; for
    obs and sparsegpt it applies to obs and one line says sparsegpt has no such setting."""
    with pytest.raises(SweepError, match="--fisher-damping: none of --methods"):
        config(assets, tmp_path / "a", methods=["magnitude"], fisher_damping=1e-4).validate()
    with pytest.raises(SweepError, match="--rel-damp: none of --methods"):
        config(assets, tmp_path / "b", methods=["obs"], rel_damp=0.05).validate()
    cfg = config(assets, tmp_path / "c", methods=["obs", "sparsegpt"], rel_damp=0.05)
    cfg.validate()
    said = capsys.readouterr().out
    assert "--gradients, --block-size, --fisher-damping do not apply to sparsegpt" in said
    pipes = cfg.method_pipelines()
    assert pipes["sparsegpt"].chooser.rel_damp == 0.05
    assert pipes["obs"].chooser.fisher_damping == 1e-6 and pipes["obs"].chooser.gradients == 8
    # magnitude reads no data; the reconstruction after it reads --batches (it read 128 before)
    cfg = config(assets, tmp_path / "d", methods=["magnitude", "magnitude+reconstruct"], batches=3)
    cfg.validate()
    said = capsys.readouterr().out
    assert "--batches does not apply to magnitude " in said and "magnitude+reconstruct" not in said
    assert cfg.method_pipelines()["magnitude+reconstruct"].batches == 3
    # unset, the pass after a gradient method reads the chooser's count (OBS's 8 gradients),
    # not the sweep's one-shot default of 64 for the layer-wise methods
    cfg = config(assets, tmp_path / "f", methods=["obs+reconstruct", "sparsegpt+reconstruct"])
    pipes = cfg.method_pipelines()
    assert pipes["obs+reconstruct"].batches == 8 and pipes["sparsegpt+reconstruct"].batches == 64


def test_under_a_recipe_a_setting_its_modifier_cannot_carry_is_said_or_refused(assets, tmp_path, capsys):  # fmt: skip
    """A gradual sweep writes the settings into the recipe's modifiers: --batches has no field
    in the gradient OBS modifier, so for obs it would be dropped; it is refused (no method's
    modifier carries it) or said for the methods whose modifier lacks it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GRADUAL)
    kw = dict(sparsities=[0.5], recipe=str(recipe), finetune_epochs=0)
    with pytest.raises(SweepError, match="--batches: none of --methods"):
        config(assets, tmp_path / "a", methods=["obs+reconstruct"], batches=4, **kw).validate()
    config(assets, tmp_path / "b", methods=["obs", "sparsegpt"], batches=4, **kw).validate()
    said = capsys.readouterr().out
    assert (
        "--batches does not apply to obs (the recipe's modifier for it has no such field)" in said
    )


def test_precision_reaches_the_layerwise_parts_and_gptq_or_is_refused(assets, tmp_path):
    import torch

    LW = {"gradients": None, "block_size": None, "fisher_damping": None}  # OBS-only settings

    with pytest.raises(SweepError, match="--precision: none of --methods"):
        config(assets, tmp_path / "a", methods=["obs"], precision="float32").validate()
    with pytest.raises(SweepError, match=r"^--precision must be float64 or float32, got 'half'"):
        config(assets, tmp_path / "b", methods=["sparsegpt"], precision="half", **LW).validate()
    cfg = config(assets, tmp_path / "c", methods=["sparsegpt", "wanda"], precision="float32", **LW)
    cfg.validate()
    pipes = cfg.method_pipelines()
    assert pipes["sparsegpt"].chooser.dtype == torch.float32
    assert pipes["wanda"].chooser.dtype == torch.float32
    assert (
        config(assets, tmp_path / "d", methods=["sparsegpt"], **LW)
        .method_pipelines()["sparsegpt"]
        .chooser.dtype
        == torch.float64
    )
    # GPTQ alone takes it (no pruning method has it): accepted
    config(assets, tmp_path / "e", methods=["gptq"], bits=[4], precision="float32", **LW).validate()


def test_a_changed_recipe_file_is_refused(assets, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GRADUAL)
    out = tmp_path / "sweep"
    kw = dict(methods=["magnitude"], sparsities=[0.5], recipe=str(recipe), finetune_epochs=0)
    run_sweep(config(assets, out, **kw))
    recipe.write_text(GRADUAL.replace("end_epoch: 1.5", "end_epoch: 1.0"))
    with pytest.raises(SweepError, match="different recipe_sha256"):
        run_sweep(config(assets, out, **kw))


GRADUAL = """
modifiers:
  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 2.0}
  - !OBSPruningModifier
    params: ["re:bert.encoder.layer.*.intermediate.dense.weight"]
    init_sparsity: 0.1
    final_sparsity: 0.5
    start_epoch: 0.5
    end_epoch: 1.5
    update_frequency: 0.5
    num_grads: 4
    fisher_block_size: 8
    damp: 1e-6
"""


def test_gradual_sweep_applies_the_pruning_options(assets, tmp_path, monkeypatch):
    import curvature.recipes.manager as manager_module

    seen = []
    real = manager_module.prune
    monkeypatch.setattr(manager_module, "prune", lambda *a, **k: seen.append(k) or real(*a, **k))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GRADUAL)
    kw = dict(methods=["obs"], sparsities=[0.5], recipe=str(recipe), finetune_epochs=0)
    run_sweep(
        config(
            assets,
            tmp_path / "a",
            **kw,
            gradients=None,
            block_size=None,
            fisher_damping=None,
            params=None,
        )
    )

    def settings(k):
        c = k["method"].chooser
        return c.gradients, c.block_size, c.fisher_damping

    assert {settings(k) for k in seen} == {(4, 8, 1e-6)}  # the recipe's
    seen.clear()
    run_sweep(config(assets, tmp_path / "b", **kw, gradients=6, block_size=16, fisher_damping=1e-3))
    assert {settings(k) for k in seen} == {(6, 16, 1e-3)}
    assert all(k["params"] == ["re:bert.encoder"] for k in seen)


def test_n_m_sweep_refuses_other_sparsities(assets, tmp_path):
    with pytest.raises(SweepError, match="2:4 mask prunes exactly 0.5"):
        config(assets, tmp_path / "x", mask="2:4", sparsities=[0.5, 0.8]).validate()
    cfg = config(assets, tmp_path / "x", mask="2:4", sparsities=None)
    cfg.validate()
    assert cfg.sparsities == [0.5]


def test_a_quantization_sweep_gives_gptq_and_rtn_rows_with_bits_per_parameter(assets, tmp_path):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "quant"
    cfg = config(
        assets, out, methods=["gptq", "rtn"], bits=[8, 3], group="8", sparsities=None,
        finetune_epochs=0.0, params=None, batches=4, speed_reps=0,
    )  # fmt: skip
    for k in ("gradients", "fisher_damping", "block_size"):
        setattr(cfg, k, None)
    points = run_sweep(cfg)
    names = [p["method"] for p in points]
    assert names == ["dense", "gptq-8bit", "gptq-3bit", "rtn-8bit", "rtn-3bit"]
    by = {p["method"]: p for p in points}
    dense = by["dense"]
    for name in names[1:]:
        p = by[name]
        assert p["target_sparsity"] == 0.0 and p["bits"] == int(name[-4])
        assert p["bits_per_weight"] == pytest.approx(p["bits"] + 32 / 8)
        # the packed file (asymmetric: a byte per code) is smaller than the float file
        assert p["compressed_format"] == "int-quantized"
        assert p["compressed_bytes"] < dense["dense_bytes"]
    assert by["gptq-3bit"]["loss"] <= by["rtn-3bit"]["loss"] * 1.05
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["method"] for r in rows) == sorted(names)


def test_gptq_prunes_in_the_sweep_and_bad_quantizer_settings_are_one_line(assets, tmp_path):
    pytest.importorskip("compressed_tensors")
    cfg = config(
        assets, tmp_path / "joint", methods=["gptq", "magnitude"], bits=[4], group="none",
        sparsities=None, mask="2:4", finetune_epochs=0.0, batches=4, speed_reps=0,
    )  # fmt: skip
    cfg.gradients = cfg.fisher_damping = None
    points = run_sweep(cfg)
    joint = next(p for p in points if p["method"] == "gptq-4bit")
    assert joint["mask"] == "2:4" and joint["sparsity"] >= 0.5
    assert joint["compressed_format"] == "int-quantized"
    bad = [
        (dict(methods=["gptq"], bits=None), "--bits: give the bit widths for gptq"),
        (dict(methods=["obs"], bits=[4]), "--bits: none of --methods (obs) quantizes"),
        (dict(methods=["gptq"], bits=[5]), "--bits: 5 is not one of 2, 3, 4, 8"),
        (dict(methods=["rtn"], bits=[4], sparsities=[0.5]), "rtn reads no data"),
        (dict(methods=["magnitude", "rtn"], bits=[4], sparsities=None), "rtn reads no data"),
        (dict(methods=["gptq"], bits=[4], group="-3"), "--group must be a positive integer"),
        (dict(methods=["gptqq"], bits=[4]), "--methods: unknown ['gptqq']"),
    ]
    for kw, message in bad:
        cfg = config(assets, tmp_path / "bad", **kw)
        with pytest.raises(SweepError, match=None) as err:
            cfg.validate()
        assert message in str(err.value), (kw, str(err.value))
    assert not (tmp_path / "bad").exists()


def test_a_structured_sweep_resizes_and_measures_what_it_removed(assets, tmp_path):
    """structured-<chooser> rows: the fraction of heads and neurons removed in every block, the
    model resized (its file smaller and its measured latency recorded), second-order beside a
    baseline at the same sizes; the reached sparsity is the blocks' linear weights removed."""
    out = tmp_path / "sweep"
    cfg = config(
        assets, out, methods=["structured-obs", "structured-magnitude"], sparsities=[0.5],
        finetune_epochs=0.0, batches=4, speed_reps=1,
    )  # fmt: skip
    for k in ("gradients", "fisher_damping", "block_size"):
        setattr(cfg, k, None)
    points = run_sweep(cfg)
    dense = next(p for p in points if p["method"] == "dense")
    rows = [p for p in points if p["method"] != "dense"]
    assert [p["method"] for p in rows] == ["structured-obs", "structured-magnitude"]
    for p in rows:
        assert p["mask"] == "structured" and p["structure_sizes"] == {
            "heads": [1, 1], "neurons": [16, 16]
        }  # fmt: skip
        # tiny BERT blocks: q, k, v, o 16x16 and 32x16 + 16x32 -> 8x16 ... half of everything
        assert p["sparsity"] == pytest.approx(0.5)
        assert p["dense_bytes"] < dense["dense_bytes"]
        assert p["latency_ms_dense"] > 0
    assert "| structured-obs | structured | oneshot | 0.50 |" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"methods": ["structured-obz"]}, "structured-obs"),
        ({"methods": ["structured-obs"], "mask": "2:4"}, "--mask 2:4: structured-obs removes"),
        ({"methods": ["structured-obs"], "sparsities": [0.0]}, "a fraction > 0"),
        ({"methods": ["structured-magnitude"], "rel_damp": 0.1}, "--rel-damp: none of"),
    ],
)
def test_bad_structured_sweeps_are_one_line(assets, tmp_path, kw, message):
    cfg = config(assets, tmp_path / "s", **kw)
    for k in ("gradients", "fisher_damping", "block_size"):
        setattr(cfg, k, None)
    with pytest.raises(SweepError, match=message.replace("+", r"\+")):
        cfg.validate()
    assert not (tmp_path / "s").exists()
