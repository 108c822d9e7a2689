import math
from pathlib import Path

import pytest
import torch
from models import tiny_bert, tiny_bert_config, tiny_llama_config

from curvature.recipes import RecipeError, RecipeManager, load_recipe, parse_recipe
from curvature.recipes.schema import OBSPruningModifier

ROOT = Path(__file__).resolve().parents[2]

LEGACY = """---
# a Markdown recipe in the older format, front matter between --- lines
num_epochs: &num_epochs 30
init_sparsity: 0.7
final_sparsity: 0.9
qat_start: 100
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !LearningRateFunctionModifier
    start_epoch: 0.0
    end_epoch: 2.0
    lr_func: linear
    init_lr: 8e-5
    final_lr: 8e-6
  - !LearningRateFunctionModifier
    start_epoch: 2.0
    end_epoch: eval(num_epochs)
    lr_func: cyclic_linear
    cycle_epochs: 4.0
    init_lr: 8e-5
    final_lr: 8e-6
pruning_modifiers:
  - !OBSPruningModifier
    params: ["re:bert.encoder.layer.*.attention.self.query.weight", "re:bert.encoder.layer.*.output.dense.weight"]
    init_sparsity: eval(init_sparsity)
    final_sparsity: eval(final_sparsity)
    start_epoch: 2
    end_epoch: eval(num_epochs - 4)
    update_frequency: 2
    inter_func: cubic
    global_sparsity: True
    leave_enabled: True
    mask_type: unstructured
    num_grads: 1024
    damp: 1e-7
    fisher_block_size: 50
    grad_sampler_kwargs:
      batch_size: 16
    num_recomputations: 1
distillation_modifiers:
  - !DistillationModifier
    start_epoch: 0.0
    hardness: 1.0
    temperature: 2.0
    distill_output_keys: [start_logits, end_logits]
---

# Notes in Markdown after the front matter are ignored.
"""


def test_legacy_recipe_parses():
    r = parse_recipe(LEGACY, "legacy.md")
    (obs,) = r.of(OBSPruningModifier)
    assert obs.final_sparsity == 0.9 and obs.end_epoch == 26 and obs.fisher_block_size == 50
    assert obs.grad_sampler_kwargs == {"batch_size": 16} and obs.damp == 1e-7
    assert r.num_epochs == 30
    assert obs.line == 25


def test_schedule_and_lr_from_recipe():
    r = parse_recipe(LEGACY)
    m = RecipeManager(r, tiny_bert(num_labels=3))
    sched = m.pruning_schedule()
    assert [e for e, _, _ in sched] == list(range(2, 27, 2))
    assert sched[0][2] == pytest.approx(0.7) and sched[-1][2] == pytest.approx(0.9)
    assert m.lr_at(0.0) == pytest.approx(8e-5) and m.lr_at(1.0) == pytest.approx(4.4e-5)
    assert m.lr_at(4.0) == pytest.approx(8e-5 - 7.2e-5 * 0.5)  # cycle of 4 from epoch 2, halfway
    assert [e for e, _, _ in m.due(5.0)] == [4]  # only the latest due point per modifier
    assert m.distillation_at(10).temperature == 2.0


def test_overrides_and_eval_arithmetic():
    r = parse_recipe(LEGACY, overrides={"final_sparsity": 0.97})
    assert r.of(OBSPruningModifier)[0].final_sparsity == 0.97


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            ("fisher_block_size: 50", "fisher_blok_size: 50"),
            r"line 38: OBSPruningModifier: unknown field 'fisher_blok_size'; did you mean 'fisher_block_size'\?",
        ),
        (
            ("!OBSPruningModifier", "!OBSPrunningModifier"),
            r"line 25: unknown modifier !OBSPrunningModifier; did you mean !OBSPruningModifier\? known: ",
        ),
        (
            ("final_sparsity: 0.9", "final_sparsity: 1.2"),
            r"field 'final_sparsity': Input should be less than 1 \(got 1.2\)",
        ),
        (
            ("    end_epoch: eval(num_epochs - 4)", "    end_epoch: 1"),
            r"line 25: OBSPruningModifier: end_epoch \(1.0\) is before start_epoch \(2.0\)",
        ),
        (
            ("mask_type: unstructured", "mask_type: block4\n    fisher_block_size_x: 1"),
            r"unknown field 'fisher_block_size_x'",
        ),
        (
            ("fisher_block_size: 50", "fisher_block_size: 50\n    mask_type: 4:8"),
            r"mask_type 4:8 needs final_sparsity 0.5",
        ),
        (
            ("inter_func: cubic", "inter_func: quadratic"),
            r"line 32: OBSPruningModifier: field 'inter_func': Input should be 'cubic', 'linear' or 'inverse_cubic'",
        ),
        (
            ("eval(num_epochs - 4)", "eval(num_epoch - 4)"),
            r"unknown variable 'num_epoch' \(did you mean 'num_epochs'\?\)",
        ),
        (("eval(num_epochs - 4)", "eval(__import__('os'))"), r"only arithmetic"),
        (("damp: 1e-7", "damp: -1e-7"), r"field 'damp': Input should be greater than 0"),
        (
            ("batch_size: 16", "batchsize: 16"),
            r"grad_sampler_kwargs: unknown key\(s\) \['batchsize'\]",
        ),
        (
            (
                "    init_lr: 8e-5\n    final_lr: 8e-6\n  - !LearningRateFunctionModifier\n    start_epoch: 2.0",
                "    final_lr: 8e-6\n  - !LearningRateFunctionModifier\n    start_epoch: 2.0",
            ),
            r"LearningRateFunctionModifier: required field 'init_lr' is missing",
        ),
    ],
)
def test_validation_errors_name_line_and_field(edit, message):
    text = LEGACY.replace(*edit, 1)
    assert text != LEGACY
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "r.md")


def test_bad_yaml_and_structure():
    with pytest.raises(RecipeError, match="line 2: not valid YAML"):
        parse_recipe("a: [1\nb: 2", "x.yaml")
    with pytest.raises(RecipeError, match="no modifier list"):
        parse_recipe("num_epochs: 3")
    with pytest.raises(RecipeError, match="every entry needs a tag"):
        parse_recipe("modifiers:\n  - {start_epoch: 1}")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("/nonexistent/recipe.yaml")


def test_params_checked_against_model_before_training():
    text = LEGACY.replace(
        "re:bert.encoder.layer.*.output.dense.weight", "bert.encoder.layer.0.output.dens.weight"
    )
    r = parse_recipe(text)
    with pytest.raises(
        ValueError,
        match="'bert.encoder.layer.0.output.dens.weight' matches no parameter.*nearest parameter names: bert.encoder.layer.0.output.dense.weight",
    ):
        RecipeManager(r, tiny_bert(num_labels=3))


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_match_bert(path):
    """Each shipped recipe against a tiny BERT with its task's head (BERT-base's names)."""
    import transformers as tf

    from curvature.recipes.schema import ConstantPruningModifier, DistillationModifier

    r = load_recipe(path)
    if "smollm2" in path.name:  # a decoder recipe: a tiny model with SmolLM2's parameter names
        model = tf.LlamaForCausalLM(tiny_llama_config(64))
        manager = RecipeManager(r, model)
        assert len(manager.pruned_param_names) == 14
        return
    head = (
        tf.BertForQuestionAnswering
        if "squad" in path.name
        else tf.BertForMaskedLM
        if "mlm" in path.name
        else tf.BertForSequenceClassification
    )
    torch.manual_seed(0)
    model = head(tiny_bert_config(64, 2 if "squad" in path.name else 3))
    manager = RecipeManager(r, model)  # same parameter names as BERT-base
    if "sparse-transfer" in path.name:
        assert r.of(ConstantPruningModifier) and not r.of(OBSPruningModifier)
        manager.step(0.0)  # the zeros of the given model become the masks
    else:
        assert r.of(OBSPruningModifier) or "magnitude" in path.name
        assert manager.pruned_param_names
    assert math.isfinite(r.num_epochs)
    outputs = model(input_ids=torch.randint(5, 60, (2, 8)))
    if r.of(DistillationModifier):
        manager.check_outputs(list(outputs.keys()))
