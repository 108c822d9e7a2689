"""What a new user hits first: cycled batches, skipped parameters, warnings as one line, partial
outputs, file modes, and the documented loaders."""

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from models import make_csv, make_model_dir

from curvature.cli.main import main
from curvature.pruning import parts, prune


def _mlp_problem(n_batches):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(n_batches)
    ]
    return model, batches


def _loss(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1])


def test_prune_says_when_batches_are_cycled():
    model, batches = _mlp_problem(3)
    with pytest.warns(UserWarning, match="data has 3 batches but gradients=8") as rec:
        report = prune(model, batches, loss_fn=_loss, sparsity=0.5, params=["0.weight", "3.weight"], progress=False, method=parts.OBS(gradients=8, block_size=4))  # fmt: skip
    assert len([w for w in rec if "gradients=" in str(w.message)]) == 1  # once, not per step
    assert report.distinct_batches == 3 and report.gradients == 8
    assert report.to_dict()["distinct_batches"] == 3
    model, batches = _mlp_problem(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough batches: no warning
        report = prune(model, batches, loss_fn=_loss, sparsity=0.5, params=["0.weight", "3.weight"], progress=False, method=parts.OBS(gradients=8, block_size=4))  # fmt: skip
    assert report.distinct_batches == 8
    # magnitude pruning reads no data: nothing to report
    report = prune(model, batches, loss_fn=_loss, sparsity=0.6, method="magnitude",
                   params=["0.weight"], progress=False)  # fmt: skip
    assert report.distinct_batches is None


def test_pattern_skips_biases_and_norms_and_says_so():
    model, batches = _mlp_problem(8)
    with pytest.warns(UserWarning, match=r"2 parameters matched by a re: pattern were skipped"):
        report = prune(model, batches, loss_fn=_loss, sparsity=0.5, params=["re:.*weight", "re:0\\..*"], progress=False, method=parts.OBS(gradients=8, block_size=4))  # fmt: skip
    assert sorted(report.param_sparsity) == ["0.weight", "3.weight"]
    assert sorted(report.skipped) == ["0.bias", "1.weight"]  # the bias and the LayerNorm weight
    assert all("1-D" in why for why in report.skipped.values())
    # a 1-D parameter named exactly is pruned as asked, and not reported as skipped
    report = prune(model, batches, loss_fn=_loss, sparsity=0.5, params=["re:.*weight", "1.weight"], progress=False, method=parts.OBS(gradients=8, block_size=4))  # fmt: skip
    assert "1.weight" in report.param_sparsity and "1.weight" not in report.skipped


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_model_dir(root / "model"), make_csv(root / "train.csv")


RECIPE = """
modifiers:
  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 1.0}
  - !OBSPruningModifier
    params: ["re:bert.encoder.*weight"]
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 0.0
    update_frequency: 1.0
    num_grads: 4
    fisher_block_size: 8
    damp: 1.0e-6
"""


def test_cli_prints_warnings_as_one_line_and_reports_skips(assets, tmp_path, capsys):
    model_dir, data = assets
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    argv = ["prune", str(recipe), "--model", str(model_dir), "--data", str(data)]
    assert main([*argv, "--output", str(out), "--batch-size", "8", "--no-progress"]) == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "skipped" in l]
    assert lines and all(l.startswith("warning: prune: ") for l in lines), err
    assert "UserWarning" not in err and "warnings.warn" not in err
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    skipped = metrics["pruning_steps"][0]["skipped"]
    assert skipped and all("LayerNorm" in n or n.endswith("bias") for n in skipped)
    assert not any("LayerNorm" in n for n in metrics["param_sparsity"])


def test_partial_outputs_cleaned_named_and_files_follow_the_umask(assets, tmp_path, capsys):
    from curvature.cli.outputs import atomic_output as _atomic_output

    out = tmp_path / "o"
    with pytest.raises(RuntimeError), _atomic_output(out):
        raise RuntimeError("boom")
    assert not list(tmp_path.glob(".o.partial-*")) and not out.exists()
    # a killed process's leftover is named by the next run
    (tmp_path / ".o.partial-abc123").mkdir()
    with pytest.warns(UserWarning, match=r"\.o\.partial-abc123"), _atomic_output(out) as tmp:
        (tmp / "f.txt").write_text("x")
        (tmp / "sub").mkdir()
    old = os.umask(0o022)
    try:
        with _atomic_output(tmp_path / "u") as tmp:
            (tmp / "f.txt").write_text("x")
            (tmp / "sub").mkdir()
            os.chmod(tmp / "f.txt", 0o600)
    finally:
        os.umask(old)
    assert oct((tmp_path / "u").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "u" / "sub").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "u" / "f.txt").stat().st_mode & 0o777) == "0o644"


def test_sigterm_removes_the_partial_output(assets, tmp_path):
    model_dir, data = assets
    out = tmp_path / "t"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "curvature.cli.main", "train", "--model", str(model_dir),
         "--data", str(data), "--output", str(out), "--epochs", "200", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".t.partial-*")) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert list(tmp_path.glob(".t.partial-*")), "the job never started writing"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "terminated; unfinished output removed" in err
    assert not list(tmp_path.glob(".t.partial-*")) and not out.exists()


def test_logged_learning_rate_is_the_applied_one(tmp_path):
    from transformers import TrainingArguments

    from curvature.integrations.hf import RecipeTrainer

    model = torch.nn.Linear(2, 2)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=5e-5, report_to=[],
                             use_cpu=True)  # fmt: skip
    trainer = RecipeTrainer(model=model, args=args, optimizer_name="adamw")
    trainer.create_optimizer()
    trainer.optimizer.param_groups[0]["lr"] = 3e-4  # as a recipe's learning-rate modifier sets it
    trainer.log({"loss": 1.0, "learning_rate": 5e-5})
    assert trainer.state.log_history[-1]["learning_rate"] == 3e-4


def test_train_says_its_defaults(assets, tmp_path, capsys):
    import json

    assert main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "adamw lr 0.0001" in help_text and "mfac lr 0.03, gradients=16" in help_text
    assert "training batch (default 16)" in help_text and "(default 128)" in help_text
    model_dir, data = assets
    out = tmp_path / "t"
    argv = ["train", "--optimizer", "mkor-h", "--model", str(model_dir), "--data", str(data)]
    assert main([*argv, "--output", str(out), "--max-steps", "2", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key, value in dict(epochs=1.0, max_steps=2, max_length=128, batch_size=16).items():
        assert m[key] == value, key
    assert m["lr"] == 1e-4 and m["optimizer_kwargs"]["base_optimizer"] == "adamw"
    assert "switched_to_base_at_step" in m and m["switched_to_base_at_step"] is None


def test_gradient_accumulation_gives_the_full_batch_step(assets, tmp_path):
    """Two micro-batches of 4 with accumulation take the same step as one batch of 8: the
    trainer's mean loss is divided by the accumulation steps (it was not, when the model accepts
    loss keywords)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
    )

    from curvature.integrations.hf import RecipeTrainer
    from curvature.tasks import load_task, tokenize

    model_dir, data = assets
    tok = AutoTokenizer.from_pretrained(model_dir)
    task = load_task(data, max_train=8)
    enc = tokenize(task, tok, max_length=16)["train"]
    after = []
    for bs, ga in ((8, 1), (4, 2)):
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )  # no dropout: the two runs see the same function
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{bs}"), per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga, max_steps=1, learning_rate=0.5, report_to=[],
            use_cpu=True, lr_scheduler_type="constant", seed=0,
        )  # fmt: skip
        trainer = RecipeTrainer(model=model, args=args, train_dataset=enc,
                                data_collator=DataCollatorWithPadding(tok), optimizer_name="sgd",
                                optimizer_kwargs={"momentum": 0.0})  # fmt: skip
        trainer.train()
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(after[0], after[1], rtol=1e-4, atol=1e-6)


def test_data_file_columns(tmp_path):
    from curvature.tasks import load_task

    p = tmp_path / "d.csv"
    p.write_text("text,sentence1,label\na b,c d,0\ne f,g h,1\ni j,k l,0\nm n,o p,1\n")
    assert load_task(p).text_columns == ("text",)  # an extra sentence1 is ignored
    p.write_text("sentence1,sentence2,label\na b,c d,x\ne f,g h,y\ni j,k l,x\nm n,o p,y\n")
    t = load_task(p)
    assert t.text_columns == ("sentence1", "sentence2") and t.label_names == ["x", "y"]


def test_dense_baseline_trains_the_same_steps(assets, tmp_path, capsys):
    import json

    model_dir, data = assets
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        RECIPE.replace("end_epoch: 1.0}", "end_epoch: 2.0}")
        .replace("start_epoch: 0.0\n    end_epoch: 0.0", "start_epoch: 1.0\n    end_epoch: 1.0")
        .replace('["re:bert.encoder.*weight"]', '["re:bert.encoder.*dense.weight"]')
    )
    out = tmp_path / "out"
    argv = ["prune", str(recipe), "--model", str(model_dir), "--data", str(data), "--output"]
    argv += [str(out), "--batch-size", "8", "--no-progress", "--dense-baseline"]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    base = m["dense_equal_budget"]
    assert base["steps"] == m["steps"] > 0 and base["epochs"] == 2.0
    assert 0.0 <= base["accuracy"] <= 1.0
    printed = capsys.readouterr().out
    assert f"dense, {m['steps']} steps" in printed and f"pruned, {m['steps']} steps" in printed
    # the baseline really is dense, and the pruned model really is pruned
    assert m["sparsity"] > 0.4
    report = (out / "report.md").read_text()
    assert f"dense, the same {m['steps']} steps without pruning" in report
    # the headline comparison is the equal-budget one: the paired difference, the console line,
    # metrics.json and the report compare with the dense model of the same steps first
    assert m["compared_with"] == "dense_equal_budget"
    pruned, dense = m["pruned"], m["dense"]
    assert pruned["accuracy_delta"] == pytest.approx(pruned["accuracy"] - base["accuracy"])
    assert pruned["accuracy_delta_dense"] == pytest.approx(pruned["accuracy"] - dense["accuracy"])
    assert (
        pruned["accuracy_delta_ci_low"]
        <= pruned["accuracy_delta"]
        <= pruned["accuracy_delta_ci_high"]
    )
    lines = [x for x in printed.splitlines() if x.startswith("pruned - ")]
    assert lines[0].startswith(f"pruned - dense of the same {m['steps']} steps accuracy: ")
    assert lines[1].startswith("pruned - dense before pruning accuracy: ")
    assert "vs dense same steps" in report and "equal budget" in report
    # with no training steps to repeat the option is refused in one line, nothing written
    capsys.readouterr()
    other = tmp_path / "oneshot"
    argv[argv.index(str(out))] = str(other)
    assert main([*argv, "--oneshot"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --dense-baseline trains the dense model")
        and len(err.splitlines()) == 1
    )
    assert not other.exists() and not list(tmp_path.glob(".oneshot.partial-*"))


def test_trainer_logs_the_recipes_learning_rate(assets, tmp_path):
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from curvature.integrations.hf import RecipeCallback, RecipeTrainer
    from curvature.recipes import RecipeManager, load_recipe
    from curvature.tasks import load_classifier, load_task, tokenize

    model_dir, data = assets
    recipe = tmp_path / "lr.yaml"
    recipe.write_text(
        "modifiers:\n  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 2.0}\n"
        "  - !LearningRateFunctionModifier {lr_func: linear, init_lr: 1.0e-3, final_lr: 1.0e-4,"
        " start_epoch: 0.0, end_epoch: 2.0}\n"
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    task = load_task(data, max_train=16)
    model, _ = load_classifier(model_dir, task.num_labels)
    manager = RecipeManager(load_recipe(str(recipe)), model)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=8,
                             num_train_epochs=2, learning_rate=5e-5, lr_scheduler_type="constant",
                             logging_steps=1, report_to=[], use_cpu=True)  # fmt: skip
    trainer = RecipeTrainer(model=model, args=args,
                            train_dataset=tokenize(task, tok, max_length=16)["train"],
                            data_collator=DataCollatorWithPadding(tok), manager=manager)  # fmt: skip
    trainer.add_callback(RecipeCallback(manager, progress=False))
    trainer.train()
    logged = [(h["epoch"], h["learning_rate"]) for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    for epoch, lr in logged:  # the recipe's rate at that point, not the Trainer's 5e-5
        assert lr == pytest.approx(manager.lr_at(epoch)), (epoch, lr)
    assert logged[0][1] != logged[-1][1]
