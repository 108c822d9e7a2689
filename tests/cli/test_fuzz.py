"""Bad input, a few hundred ways: every mutated recipe and every bad option of every subcommand
gives exit code 2 and one line on stderr naming what is wrong, never a traceback, and writes
nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from models import make_csv, make_model_dir

from curvature.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "published-recipes"
RECIPES = sorted(ROOT.glob("recipes/*.yaml")) + sorted(
    p for p in SHARED.rglob("*") if p.suffix in (".yaml", ".md")
)

NUMERIC = (
    "final_sparsity", "init_sparsity", "num_grads", "fisher_block_size", "damp", "start_epoch",
    "end_epoch", "update_frequency", "init_lr", "final_lr", "hardness", "temperature",
    "learning_rate", "weight_decay", "num_calibration_batches",
)  # fmt: skip
OUT_OF_RANGE = {
    "final_sparsity": "1.5", "init_sparsity": "-0.5", "fisher_block_size": "0",
    "num_grads": "-1", "damp": "-1.0", "hardness": "2.0", "temperature": "0",
    "init_lr": "-1.0", "update_frequency": "-3", "start_epoch": "-7",
}  # fmt: skip
TYPOS = {
    "fisher_block_size": "fisher_blok_size", "final_sparsity": "final_sparsty",
    "num_grads": "num_grad", "init_lr": "init_lrr", "mask_type": "mask_typ",
}  # fmt: skip


def _set(text: str, field: str, value: str) -> str | None:
    """``text`` with the first block-style ``field: ...`` line of a modifier set to ``value``."""
    pattern = re.compile(rf"^(\s+(?:- )?){field}: .*$", re.M)
    out, n = pattern.subn(lambda m: f"{m.group(1)}{field}: {value}", text, count=1)
    return out if n else None


def recipe_cases() -> list[tuple[str, str, str]]:
    """``(id, recipe text, what the message must name)``."""
    cases = []
    for path in RECIPES:
        text = path.read_text()
        name = path.stem
        for field in NUMERIC:
            bad = _set(text, field, "abc")
            if bad:
                cases.append((f"{name}-{field}-type", bad, field))
        for field, value in OUT_OF_RANGE.items():
            bad = _set(text, field, value)
            if bad:
                cases.append((f"{name}-{field}-range", bad, field))
        for field, typo in TYPOS.items():
            bad = re.sub(rf"^(\s+(?:- )?){field}:", rf"\g<1>{typo}:", text, count=1, flags=re.M)
            if bad != text:
                cases.append((f"{name}-{field}-typo", bad, typo))
        tag = re.search(r"!(\w+Modifier)", text)
        if tag:
            cases.append(
                (f"{name}-tag", text.replace(tag.group(0), tag.group(0)[:-3], 1), tag.group(1)[:-2])
            )
        cut = re.sub(r"^\s+final_sparsity: [^\n{]*\n", "", text, count=1, flags=re.M)
        if cut != text and "final_sparsity" not in cut.split("Modifier", 1)[-1][:400]:
            cases.append((f"{name}-missing", cut, "final_sparsity"))
    cases += [
        ("empty", "", "recipe"),
        ("no-modifiers", "modifiers:\n", "modifiers"),
        ("a-list", "- 1\n- 2\n", "recipe"),
        ("syntax", "modifiers:\n  - !EpochRangeModifier {start_epoch: [\n", "line"),
        ("scalar-modifier", "modifiers:\n  - 42\n", "modifier"),
    ]
    return cases


CASES = recipe_cases()


def _one_clean_line(capsys, rc) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, err)
    assert "Traceback" not in err + captured.out, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_the_fuzz_covers_a_few_hundred_recipe_cases():
    assert len(CASES) >= 300, len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mutated_recipe_is_one_line(tmp_path, capsys, case):
    name, text, names = case
    path = tmp_path / "r.yaml"
    path.write_text(text)
    line = _one_clean_line(capsys, main(["check", str(path)]))
    assert names.lower() in line.lower(), line


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-assets")
    return make_model_dir(root / "model"), make_csv(root / "train.csv")


def option_cases(model, data, recipe):
    base = {
        "prune": ["prune", str(recipe), "--model", str(model), "--data", str(data)],
        "train": ["train", "--model", str(model), "--data", str(data)],
        "sweep": ["sweep", "--model", str(model), "--data", str(data)],
        "export": ["export", str(model)],
    }
    bad = {
        "prune": [
            (["--max-length", "abc"], "--max-length"), (["--max-length", "0"], "--max-length"),
            (["--batch-size", "0"], "--batch-size"), (["--max-train", "-3"], "--max-train"),
            (["--lr", "fast"], "--lr"), (["--lr", "-1"], "--lr"), (["--seed", "x"], "--seed"),
            (["--task", "translation"], "task"), (["--teacher", "/nope"], "teacher"),
            (["--set", "novar"], "NAME=VALUE"), (["--checkpoint-every", "0"], "--checkpoint-every"),
            (["--resume"], "--resume"), (["--doc-stride", "8"], "--doc-stride"),
            (["--eval-stride", "8"], "--eval-stride"), (["--eval-data", "/no/such.csv"], "no/such"),
            (["--bogus"], "--bogus"), (["--model", "/no/model"], "/no/model"),
            (["--data", "/no/data.csv"], "/no/data.csv"), (["--max-eval", "zero"], "--max-eval"),
        ],
        "train": [
            (["--optimizer", "adamx"], "adamw"), (["--opt", "bogus=1"], "bogus"),
            (["--opt", "lr"], "NAME=VALUE"), (["--lr", "-0.1"], "--lr"),
            (["--epochs", "-1"], "--epochs"), (["--max-steps", "0"], "--max-steps"),
            (["--eval-every", "0"], "--eval-every"), (["--batch-size", "-2"], "--batch-size"),
(["--opt", "scale=x", "--optimizer", "mfac"], "scale"),
            (["--opt", "damping=none", "--optimizer", "mfac"], "damping"),
        ],
        "sweep": [
            (["--methods", "obz"], "obs"), (["--methods", "sparsegpt+recon"], "reconstruct"),
            (["--sparsities", "0.5,1.5"], "--sparsities"), (["--sparsities", "a,b"], "--sparsities"),
            (["--mask", "3:2"], "3:2"), (["--mask", "2:4", "--sparsities", "0.7"], "--sparsities"),
            (["--seeds", "0"], "--seeds"), (["--speed-reps", "-1"], "--speed-reps"),
            (["--gradients", "0"], "--gradients"), (["--rel-damp", "0"], "--rel-damp"),
            (["--precision", "half"], "--precision"),
            (["--methods", "obs", "--precision", "float32"], "--precision"),
            (["--fisher-damping", "-1"], "--fisher-damping"), (["--block-size", "3", "--mask", "2:4"], "--block-size"),
            (["--baseline", "wanda"], "--baseline"), (["--recipe", "/no/recipe.yaml"], "recipe"),
            (["--task", "nope"], "task"), (["--finetune-epochs", "-1"], "--finetune-epochs"),
            (["--methods", "magnitude", "--gradients", "8"], "--gradients"),
            (["--methods", "gptq"], "--bits"), (["--methods", "gptq", "--bits", "5"], "--bits"),
            (["--methods", "gptq", "--bits", "four"], "--bits"), (["--bits", "4"], "--bits"),
            (["--methods", "gptq", "--bits", "4", "--group", "x"], "--group"),
            (["--methods", "rtn", "--bits", "4", "--sparsities", "0.5"], "rtn"),
        ],
        "export": [
            (["--threads", "0"], "--threads"), (["--max-length", "0"], "--max-length"),
            (["--bogus"], "--bogus"),
        ],
    }  # fmt: skip
    out = []
    for command, items in bad.items():
        for extra, names in items:
            out.append((f"{command} {' '.join(extra)}", base[command] + extra, names))
    out += [
        ("report missing", ["report", "/no/folder"], "/no/folder"),
        ("check missing", ["check", "/no/recipe.yaml"], "/no/recipe.yaml"),
        ("unknown command", ["bogus"], "bogus"),
        ("export missing", ["export", "/no/folder", "--output", "/tmp/x-export"], "/no/folder"),
    ]
    return out


RECIPE = ROOT / "recipes" / "default-minilm.yaml"
OPTION_IDS = [c[0] for c in option_cases("m", "d", RECIPE)]


@pytest.mark.parametrize("index", range(len(OPTION_IDS)), ids=OPTION_IDS)
def test_a_bad_option_is_one_line_and_writes_nothing(assets, tmp_path, capsys, index):
    model, data = assets
    _, argv, names = option_cases(model, data, RECIPE)[index]
    out = tmp_path / "out"
    if argv[0] in ("prune", "train", "sweep"):
        defaults = ["--output", str(out), "--no-progress", "--max-train", "16", "--max-eval", "8"]
        argv = [argv[0], *defaults, *argv[1:]]  # the case's own values come last and win
    if argv[0] == "export":
        argv = [*argv[:2], "--output", str(out), *argv[2:]]
    line = _one_clean_line(capsys, main(argv))
    assert names.lower() in line.lower(), line
    assert not out.exists() and not list(tmp_path.glob(".out*")), "something was written"
