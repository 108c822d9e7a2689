"""Hugging Face integration and the command line, end to end on a tiny model and task."""

import json

import pytest
import torch
from models import RECIPE, make_csv, make_model_dir, write_recipe

from curvature.cli.main import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_model_dir(root / "model"), make_csv(root / "train.csv")


def run_prune(assets, tmp_path, text, name, *extra):
    """``curvature prune`` on the tiny model and data; returns the exit code and output folder."""
    model_dir, data = assets
    out = tmp_path / name
    argv = ["prune", write_recipe(tmp_path, text), "--model", str(model_dir), "--data", str(data)]
    rc = main([*argv, "--output", str(out), "--batch-size", "8", "--no-progress", *extra])
    return rc, out


def saved_sparsity(out, metrics):
    """Sparsity of the pruned parameters as plain transformers loads them back."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    pruned = [p for n, p in model.named_parameters() if n in metrics["param_sparsity"]]
    return pruned, sum(int((p == 0).sum()) for p in pruned) / sum(p.numel() for p in pruned)


@pytest.mark.parametrize("mask,final", [("unstructured", 0.6), ("block4", 0.6), ("2:4", 0.5)])
def test_prune_cli_gradual_end_to_end(assets, tmp_path, capsys, mask, final):
    text = RECIPE.replace("MASK", mask).replace("final_sparsity: 0.6", f"final_sparsity: {final}")
    if mask == "2:4":
        text = text.replace("init_sparsity: 0.3", "init_sparsity: 0.5")
    rc, out = run_prune(assets, tmp_path, text, "out")
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(final, abs=1e-3)
    assert metrics["dense"]["examples"] == metrics["pruned"]["examples"] == 16
    assert [round(s["epoch"], 2) for s in metrics["pruning_steps"]] == [1.0, 1.5, 2.0]
    assert "dense (before pruning)" in capsys.readouterr().out
    assert (out / "report.md").read_text().startswith("# Pruning report")
    # Loadable by plain transformers with the sparsity intact (training did not revive weights).
    pruned, fraction = saved_sparsity(out, metrics)
    assert len(pruned) == 6  # the pattern also matches attention.output.dense (".*" spans dots)
    assert fraction == pytest.approx(final, abs=1e-3)
    if mask == "2:4":
        for p in pruned:
            assert torch.all((p.reshape(-1, 4) == 0).sum(1) >= 2)
    assert not list(tmp_path.glob(".out.partial-*"))


def test_prune_cli_oneshot(assets, tmp_path):
    model_dir, data = assets
    out = tmp_path / "oneshot"
    rc = main(
        [
            "prune",
            write_recipe(tmp_path, RECIPE.replace("MASK", "unstructured")),
            "--oneshot",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.6, abs=1e-3) and metrics["epochs"] == 0


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            ("fisher_block_size", "fisher_blocksize"),
            "unknown field 'fisher_blocksize'; did you mean 'fisher_block_size'?",
        ),
        (
            ("final_sparsity: 0.6", "final_sparsity: 1.5"),
            "field 'final_sparsity': Input should be less than 1",
        ),
        (("!OBSPruningModifier", "!OBSPruner"), "unknown modifier !OBSPruner"),
        (("re:bert.encoder", "re:bert.encodr"), "matches no parameter"),
        (
            (
                "  - !OBSPruningModifier",
                "  - !DistillationModifier {distill_output_keys: [logitz], teacher: self}\n  - !OBSPruningModifier",
            ),
            "distill_output_keys 'logitz' is not an output of the model (its outputs: logits); did you mean 'logits'?",
        ),
        (
            (
                "  - !OBSPruningModifier",
                "  - !OptimizerModifier {name: adamx, kwargs: {bogus: 1}}\n  - !OBSPruningModifier",
            ),
            "got 'adamx' (did you mean 'adamw'?)",
        ),
        (
            (
                "  - !OBSPruningModifier",
                "  - !OptimizerModifier {name: mkor, kwargs: {exclude: classifier}}\n  - !OBSPruningModifier",
            ),
            "exclude must be list[str] | tuple[str, ...], got 'classifier'",
        ),
        (
            ("!OBSPruningModifier", "!QuantizationModifier"),
            "!QuantizationModifier (quantization-aware training) is not supported",
        ),
    ],
)
def test_bad_recipe_refused_before_any_output(assets, tmp_path, capsys, edit, message):
    model_dir, data = assets
    out = tmp_path / "never"
    text = RECIPE.replace("MASK", "unstructured").replace(*edit)
    rc = main(
        [
            "prune",
            write_recipe(tmp_path, text),
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".never.partial-*"))


def test_bad_data_and_model_and_output(assets, tmp_path, capsys):
    model_dir, data = assets
    recipe = write_recipe(tmp_path, RECIPE.replace("MASK", "unstructured"))
    assert (
        main(
            [
                "prune",
                recipe,
                "--model",
                str(model_dir),
                "--data",
                str(tmp_path / "nope.csv"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "data file" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("body,label\nhello,1\n")
    assert (
        main(
            [
                "prune",
                recipe,
                "--model",
                str(model_dir),
                "--data",
                str(bad),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "needs a 'text' (or 'sentence') column" in capsys.readouterr().err
    assert (
        main(
            [
                "prune",
                recipe,
                "--model",
                str(tmp_path / "nomodel"),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "is not a local folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert (
        main(
            [
                "prune",
                recipe,
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "full"),
            ]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not (tmp_path / "o").exists()


def test_check_and_help(tmp_path, capsys):
    recipe = write_recipe(tmp_path, RECIPE.replace("MASK", "unstructured"))
    assert main(["check", recipe]) == 0
    assert "schedule (epoch:sparsity): 1:0.300 1.5:0.562 2:0.600" in capsys.readouterr().out
    assert main(["--help"]) == 0  # help exits 0 through main's return code
    assert "prune" in capsys.readouterr().out


def test_distillation_with_self_teacher_and_plain_loop(assets, tmp_path):
    """A plain PyTorch loop drives the same manager; distillation changes the loss."""
    from transformers import AutoModelForSequenceClassification

    from curvature.recipes import RecipeManager, parse_recipe
    from curvature.recipes.manager import distillation_loss

    model_dir, _ = assets
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    r = parse_recipe(RECIPE.replace("MASK", "unstructured"))
    m = RecipeManager(r, model)
    x = torch.randint(5, 17, (8, 6))
    y = torch.randint(0, 2, (8,))
    batches = [{"input_ids": x[i : i + 4], "labels": y[i : i + 4]} for i in range(0, 8, 4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    m.masks.attach(model, opt)
    for step in range(12):
        epoch = step / 4
        if m.step(epoch, grad_data=batches, loss_fn=lambda mod, b: mod(**b).loss, optimizer=opt):
            m.masks.attach(model, opt)
        loss = model(**batches[step % 2]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.sparsity() == pytest.approx(0.6, abs=1e-3)
    s = torch.randn(4, 3)
    assert distillation_loss(s, s, 2.0).abs().item() < 1e-6
    assert distillation_loss(s, -s, 2.0).item() > 0


@pytest.mark.parametrize(
    "optimizer,kwargs",
    [
        ("mkor-h", "{inv_freq: 2, switch_window: 2}"),
        ("adahessian", "{seed: 0}"),
        ("mfac", "{num_grads: 4, damp: 1.0e-2}"),
    ],
)
def test_recipe_selects_second_order_optimizer_and_masks_hold(assets, tmp_path, optimizer, kwargs):
    """Pruning composes with the optimizers: OBS pruning while training with each of them."""
    text = (
        RECIPE.replace("MASK", "unstructured")
        + f"  - !OptimizerModifier {{name: {optimizer}, kwargs: {kwargs}}}\n"
    )
    rc, out = run_prune(assets, tmp_path, text, "opt", "--lr", "1e-3")
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert saved_sparsity(out, metrics)[1] == pytest.approx(0.6, abs=1e-3)
    assert metrics["pruned"]["loss"] == metrics["pruned"]["loss"]  # finite, not NaN
    assert (
        metrics["optimizer"]
        == {"mkor-h": "MKOR", "adahessian": "AdaHessian", "mfac": "MFAC"}[optimizer]
    )


@pytest.mark.parametrize(
    "optimizer,extra,learns",
    [
        ("adamw", ["--lr", "1e-2"], True),
        ("adahessian", ["--lr", "0.2"], True),
        # the Hessian estimate on half of each batch (the Trainer hands the sub-batch over); this
        # toy task is learnt in 64 steps by some seeds only, for either estimate (full-batch
        # seed 2: 0.81; half-batch seeds 0 and 1: 0.56 and 1.0), so the seed is fixed
        ("adahessian", ["--lr", "0.2", "--seed", "1", "--opt", "hessian_batch=0.5"], True),
        ("mkor-h", ["--lr", "1e-2", "--opt", "inv_freq=1"], True),
        ("muon", ["--lr", "3e-2"], True),
        ("soap", ["--lr", "1e-2"], True),
        # M-FAC does not learn this tiny model in 64 steps at any of 12 settings (lr 0.01-1,
        # damp 1e-3/1e-1, window 4/16), nor does SGD with momentum at lr 0.01-1, while AdamW and
        # AdaHessian do: `python scripts/bench_optim.py --part tiny-bert` (README); here it must
        # run, evaluate and save like the others
        ("mfac", ["--opt", "gradients=4", "--opt", "damping=1e-3"], False),
    ],
)
def test_train_cli_learns_and_saves(assets, tmp_path, capsys, optimizer, extra, learns):
    model_dir, data = assets
    out = tmp_path / f"train-{optimizer}"
    argv = ["train", "--optimizer", optimizer, "--model", str(model_dir), "--data", str(data)]
    argv += ["--output", str(out), "--epochs", "8", "--batch-size", "8", "--eval-every", "20"]
    assert main([*argv, "--no-progress", *extra]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["optimizer"] == optimizer and m["steps"] == 64
    assert [h["step"] for h in m["curve"]] == [20, 40, 60, 64]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in m["curve"])
    if learns:  # the tiny task is learnable: the majority class alone gives 0.5625
        assert m["validation"]["accuracy"] >= 0.9, m["curve"]
    assert m["seconds_per_step"] > 0 and m["peak_memory_bytes"] > 0
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out)  # a plain transformers model
    assert "validation accuracy" in capsys.readouterr().out


def test_train_cli_refuses_bad_optimizer_settings(assets, tmp_path, capsys):
    model_dir, data = assets
    base = ["train", "--model", str(model_dir), "--data", str(data), "--no-progress"]
    out = tmp_path / "bad"
    assert main([*base, "--optimizer", "adam-hessian", "--output", str(out)]) == 2
    assert "--optimizer must be one of" in capsys.readouterr().err
    assert main([*base, "--optimizer", "mfac", "--opt", "dampp=1", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "optimizer mfac" in err and "dampp" in err
    assert main([*base, "--optimizer", "adamw", "--lr", "-1", "--output", str(out)]) == 2
    assert "learning rate" in capsys.readouterr().err
    assert (
        main([*base, "--optimizer", "mkor", "--opt", "exclude=classifier", "--output", str(out)])
        == 2
    )
    assert (
        "exclude must be list[str] | tuple[str, ...], got 'classifier'" in capsys.readouterr().err
    )
    assert not out.exists()


def test_command_line_values_are_yaml():
    from curvature.cli.main import _overrides
    from curvature.optim import build_optimizer

    kw = _overrides(["hybrid=false", "exclude=[classifier, pooler]", "damping=1e-4", "inv_freq=2"])
    assert kw == {
        "hybrid": False,
        "exclude": ["classifier", "pooler"],
        "damping": 1e-4,
        "inv_freq": 2,
    }
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    opt = build_optimizer("mkor", model, lr=0.1, **kw)
    assert opt.hybrid is False and list(opt.exclude) == ["classifier", "pooler"]


def test_mask_the_model_cannot_hold_is_refused_before_training(assets, tmp_path, capsys):
    """3:5 is a valid N:M pattern, but rows of 16 and 32 weights cannot hold it."""
    text = RECIPE.replace("MASK", "'3:5'").replace("final_sparsity: 0.6", "final_sparsity: 0.4")
    text = text.replace("fisher_block_size: 8", "fisher_block_size: 10")
    rc, out = run_prune(assets, tmp_path, text, "never")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "3:5" in err and "line 6" in err, err
    assert not out.exists()


def test_prune_job_resumes_after_an_interruption(assets, tmp_path, monkeypatch):
    from curvature.cli.outputs import checkpoint_dir
    from curvature.integrations.hf import RecipeCallback

    text = RECIPE.replace("MASK", "unstructured")
    rc, full = run_prune(assets, tmp_path, text, "full")
    assert rc == 0
    want = json.loads((full / "metrics.json").read_text())

    original = RecipeCallback.on_step_end

    def interrupt(self, args, state, control, **kw):
        if state.global_step >= 13:  # after the points at epochs 1.0 and 1.5 and a checkpoint
            raise KeyboardInterrupt
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(RecipeCallback, "on_step_end", interrupt, raising=False)
    rc, _ = run_prune(assets, tmp_path, text, "cut", "--checkpoint-every", "4")
    assert rc == 130  # interrupted
    assert (
        not (tmp_path / "cut").exists()
        and (checkpoint_dir(tmp_path / "cut") / "checkpoint-12").is_dir()
    )
    monkeypatch.undo()
    rc, cut = run_prune(assets, tmp_path, text, "cut", "--resume")
    assert rc == 0
    got = json.loads((cut / "metrics.json").read_text())
    assert got["resumed_from"].endswith("checkpoint-12")
    assert [s["epoch"] for s in got["pruning_steps"]] == [s["epoch"] for s in want["pruning_steps"]]
    assert got["sparsity"] == pytest.approx(want["sparsity"])
    assert got["dense"] == want["dense"]
    assert got["pruned"]["accuracy"] == pytest.approx(want["pruned"]["accuracy"], abs=0.05)
    assert not checkpoint_dir(tmp_path / "cut").exists()


OBERT_SYNTAX = """
num_epochs: &num_epochs 2
init_sparsity: &init_sparsity 0.3
final_sparsity: &final_sparsity 0.6

training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: *num_epochs

  - !LearningRateFunctionModifier
    start_epoch: 0.0
    end_epoch: 0.5
    lr_func: linear
    init_lr: 1e-3
    final_lr: 1e-4

  - !LearningRateFunctionModifier
    start_epoch: 0.5
    end_epoch: *num_epochs
    lr_func: cyclic_linear
    cycle_epochs: 0.5
    init_lr: 1e-3
    final_lr: 1e-4

pruning_modifiers:
  - !OBSPruningModifier
    params: [
      "re:bert.encoder.layer.*.attention.self.query.weight",
      "re:bert.encoder.layer.*.attention.self.key.weight",
      "re:bert.encoder.layer.*.attention.self.value.weight",
      "re:bert.encoder.layer.*.attention.output.dense.weight",
      "re:bert.encoder.layer.*.intermediate.dense.weight",
      "re:bert.encoder.layer.*.output.dense.weight",
    ]
    init_sparsity: *init_sparsity
    final_sparsity: *final_sparsity
    start_epoch: 0.25
    end_epoch: 1.5
    update_frequency: 0.05
    inter_func: cubic
    global_sparsity: True
    leave_enabled: True
    mask_type: unstructured
    num_grads: 8
    damp: 1e-7
    fisher_block_size: 16
    grad_sampler_kwargs:
      batch_size: 4

distillation_modifiers:
  - !DistillationModifier
     hardness: 1.0
     temperature: 2.0
     distill_output_keys: [logits]
     teacher: self
"""


def test_obert_syntax_recipe_with_more_pruning_points_than_steps(assets, tmp_path):
    """The published recipes' exact syntax end to end: three modifier lists, a linear and a
    cyclic_linear rate, every OBS field, distillation from the dense model; 26 pruning points
    and 16 training steps, so most points are overtaken and must be skipped, not replayed."""
    rc, out = run_prune(assets, tmp_path, OBERT_SYNTAX, "obert")
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    steps = metrics["pruning_steps"]
    targets = [s["target_sparsity"] for s in steps]
    assert targets == sorted(targets) and len(steps) <= 16
    assert len({s["epoch"] for s in steps}) == len(steps)
    assert targets[-1] == pytest.approx(0.6) and metrics["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert metrics["dense"] is not None


class _SignSGD(torch.optim.Optimizer):
    """A toy optimizer registered by the test below: sign of the gradient times lr."""

    built = 0

    def __init__(self, params, lr: float, *, scale: float = 1.0):
        type(self).built += 1
        super().__init__(params, dict(lr=lr, scale=scale))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-g["lr"] * g["scale"])


def test_a_new_optimizer_is_one_registry_line(assets, tmp_path, capsys, monkeypatch):
    """Registered once, an optimizer is known to build_optimizer (keywords checked by type), to a
    recipe's !OptimizerModifier and to `curvature train`, which builds it exactly once."""
    from curvature.optim import registry
    from curvature.recipes import load_recipe

    monkeypatch.setattr(registry.OPTIMIZERS, "_entries", dict(registry.OPTIMIZERS._entries))
    registry.register("signsgd", lambda: _SignSGD, lr=1e-3, defaults={"scale": 0.5})

    from curvature.optim import build_optimizer

    opt = build_optimizer("signsgd", torch.nn.Linear(2, 2), lr=0.1, scale="2")
    assert isinstance(opt, _SignSGD) and opt.param_groups[0]["scale"] == 2.0
    with pytest.raises(ValueError, match=r"unexpected keyword 'scal'.*did you mean 'scale'"):
        build_optimizer("signsgd", torch.nn.Linear(2, 2), lr=0.1, scal=1)
    recipe = tmp_path / "opt.yaml"
    recipe.write_text("modifiers:\n  - !OptimizerModifier {name: signsgd, kwargs: {scale: 3}}\n")
    assert load_recipe(str(recipe)).modifiers[0].kwargs == {"scale": 3.0}

    model_dir, data = assets
    _SignSGD.built = 0
    out = tmp_path / "train-signsgd"
    argv = ["train", "--optimizer", "signsgd", "--model", str(model_dir), "--data", str(data)]
    assert main([*argv, "--output", str(out), "--max-steps", "3", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["optimizer_class"] == "_SignSGD" and m["optimizer_kwargs"] == {"scale": 0.5}
    assert m["lr"] == 1e-3 and m["steps"] == 3
    assert _SignSGD.built == 1
    assert main([*argv, "--output", str(tmp_path / "x"), "--opt", "scale=fast"]) == 2
    assert "scale must be float" in capsys.readouterr().err
