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
        if path.name.startswith("quantized-"):  # groups of 128 need wider layers than the tiny
            r = load_recipe(path, {"group": 8})
        manager = RecipeManager(r, model)
        from curvature.recipes.schema import GPTQModifier

        if path.name.startswith("quantized-"):  # quantizes every linear layer, prunes none
            (q,) = r.of(GPTQModifier)
            assert len(q.weights(model)) == 15 and not manager.pruned_param_names
            return
        if path.name.startswith("structured-"):  # removes heads and neurons, masks nothing
            from curvature.recipes.schema import StructureModifier

            (s,) = r.of(StructureModifier)
            assert (s.targets() or s.speedup) and not manager.pruned_param_names
            return
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
    elif path.name.startswith("structured-"):  # heads and neurons, removed before training
        from curvature.recipes.schema import StructureModifier

        assert r.of(StructureModifier)
    elif path.name.startswith(("compressed-", "quantized-")):  # quantized after the rest
        from curvature.recipes.schema import GPTQModifier

        (q,) = r.of(GPTQModifier)
        assert q.embedding_bits == 8 and q.group_size is None and q.symmetric
    else:
        assert r.of(OBSPruningModifier) or "magnitude" in path.name
        assert manager.pruned_param_names
    assert math.isfinite(r.num_epochs)
    outputs = model(input_ids=torch.randint(5, 60, (2, 8)))
    if r.of(DistillationModifier):
        manager.check_outputs(list(outputs.keys()))


LR_GROUPS = """
modifiers:
  - !LearningRateFunctionModifier
    start_epoch: 0.0
    end_epoch: 4.0
    lr_func: linear
    init_lr: 1.0
    final_lr: 0.0
    update_frequency: {freq}
    param_groups: {groups}
"""


def _two_group_optimizer(model):
    params = list(model.parameters())
    return torch.optim.SGD([{"params": params[:2], "lr": 7.0}, {"params": params[2:], "lr": 7.0}])


def test_a_learning_rate_function_sets_only_its_param_groups():
    """param_groups: [1] changes group 1 and leaves group 0 at its own rate (the manager used to
    set every group)."""
    model = tiny_bert(num_labels=3)
    m = RecipeManager(parse_recipe(LR_GROUPS.format(freq=-1, groups="[1]")), model)
    opt = _two_group_optimizer(model)
    m.apply_rates(opt, 1.0)
    assert opt.param_groups[0]["lr"] == 7.0 and opt.param_groups[1]["lr"] == pytest.approx(0.75)
    m = RecipeManager(parse_recipe(LR_GROUPS.format(freq=-1, groups="null")), model)
    m.apply_rates(opt, 2.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.5])


def test_a_learning_rate_function_with_update_frequency_is_a_staircase():
    """update_frequency: 1.0 holds each rate for one epoch (it used to be ignored)."""
    m = RecipeManager(parse_recipe(LR_GROUPS.format(freq=1.0, groups="null")), tiny_bert(3))
    rates = [m.lr_at(e) for e in (0.0, 0.5, 0.99, 1.0, 1.7, 2.0, 3.5)]
    assert rates == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.75, 0.5, 0.25])
    smooth = RecipeManager(parse_recipe(LR_GROUPS.format(freq=-1, groups="null")), tiny_bert(3))
    assert smooth.lr_at(0.5) == pytest.approx(0.875)


@pytest.mark.parametrize(
    "freq,groups,message",
    [
        (0.0, "null", r"update_frequency must be -1 \(every step\) or > 0 epochs \(got 0.0\)"),
        (-1, "[0, 5]", r"param_groups \[5\] do not exist; the optimizer has 2 parameter group"),
    ],
)
def test_a_learning_rate_function_refuses_what_it_cannot_do(freq, groups, message):
    text = LR_GROUPS.format(freq=freq, groups=groups)
    with pytest.raises((RecipeError, ValueError), match=message):
        model = tiny_bert(num_labels=3)
        RecipeManager(parse_recipe(text), model).apply_rates(_two_group_optimizer(model), 0.0)


def test_logging_only_fields_are_accepted_and_said(caplog):
    text = (
        "modifiers:\n  - !SetLearningRateModifier {learning_rate: 0.1, constant_logging: true}\n"
        "  - !ConstantPruningModifier {params: __ALL_PRUNABLE__, log_types: __ALL__}\n"
    )
    with caplog.at_level("INFO", logger="curvature.recipes.schema"):
        parse_recipe(text)
    said = caplog.text
    assert "constant_logging=True accepted for compatibility; the Trainer logs" in said
    assert "log_types='__ALL__' accepted for compatibility; logging goes through" in said


def test_distillation_fields_set_the_trainers_loss(tmp_path):
    """hardness mixes the task loss with the soft loss at temperature over distill_output_keys,
    from start_epoch to end_epoch: the loss equals that formula computed by hand."""
    from transformers import TrainingArguments

    from curvature.integrations.hf import RecipeTrainer, distillation_loss

    text = (
        "modifiers:\n  - !DistillationModifier {start_epoch: 0.0, end_epoch: 1.0, hardness: 0.3,"
        " temperature: 3.0, distill_output_keys: [logits]}\n"
    )
    student, teacher = tiny_bert(num_labels=3).eval(), tiny_bert(num_labels=3)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.eval()
    manager = RecipeManager(parse_recipe(text), student)
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    trainer = RecipeTrainer(model=student, args=args, manager=manager, teacher=teacher)
    batch = {"input_ids": torch.randint(5, 60, (4, 8)), "labels": torch.tensor([0, 1, 2, 0])}
    with torch.no_grad():
        out, t_out = student(**batch), teacher(**batch)
        soft = distillation_loss(out.logits, t_out.logits, 3.0)
        expected = 0.7 * out.loss + 0.3 * soft
        trainer.state.epoch = 0.5
        assert trainer.compute_loss(student, batch).item() == pytest.approx(expected.item())
        trainer.state.epoch = 1.5  # past end_epoch: the task loss alone
        assert trainer.compute_loss(student, batch).item() == pytest.approx(out.loss.item())


def test_published_pruning_fields_reach_the_parts_settings():
    """Each published OBS and layer-wise field, set away from its default, is the setting of the
    part that reads it (the recipe layer's one mapping)."""
    text = """
modifiers:
  - !OBSPruningModifier
    params: ["re:.*dense.weight"]
    init_sparsity: 0.1
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.5
    num_grads: 48
    damp: 3.0e-6
    fisher_block_size: 12
    num_recomputations: 2
    selection: independent
    grad_sampler_kwargs: {batch_size: 3}
  - !LayerwisePruningModifier
    method: obc
    params: ["re:.*query.weight"]
    final_sparsity: 0.5
    start_epoch: 0.0
    end_epoch: 0.0
    num_calibration_batches: 7
    damp: 0.05
    sequential: false
    precision: float32
"""
    from curvature.cli.jobs import _grad_batch_size

    recipe = parse_recipe(text)
    obs, layerwise = recipe.modifiers
    chooser = obs.pipeline().chooser
    assert (chooser.gradients, chooser.fisher_damping, chooser.block_size) == (48, 3.0e-6, 12)
    assert (chooser.recomputations, chooser.selection) == (2, "independent")
    chooser = layerwise.pipeline().chooser
    assert type(chooser).__name__ == "OBC"
    assert (chooser.batches, chooser.rel_damp, chooser.sequential) == (7, 0.05, False)
    assert chooser.precision == "float32"
    assert _grad_batch_size(recipe, 16) == 3


def test_gm_pruning_refuses_phased():
    with pytest.raises(RecipeError, match="phased pruning .* is not supported"):
        parse_recipe(
            "modifiers:\n  - !GMPruningModifier {final_sparsity: 0.5, phased: true, "
            "params: __ALL_PRUNABLE__}\n"
        )


#: every field of every modifier that acts, and a test that fails if it were ignored
FIELD_TESTS = {
    # LayerwisePruningModifier's (the pipeline's part) and GPTQModifier's (the Quantize part)
    "precision": "recipes/test_recipes.py::test_published_pruning_fields_reach_the_parts_settings",
    "start_epoch": "pruning/test_pruning_engine.py::test_schedule_values",
    "end_epoch": "pruning/test_pruning_engine.py::test_schedule_values",
    "init_sparsity": "pruning/test_pruning_engine.py::test_schedule_values",
    "final_sparsity": "recipes/test_published_recipes.py::test_mfac_study_recipe_runs_unchanged",
    "update_frequency": "pruning/test_pruning_engine.py::test_schedule_values",
    "inter_func": "pruning/test_pruning_engine.py::test_schedule_values",
    "params": "recipes/test_published_recipes.py::test_mfac_study_recipe_runs_unchanged",
    "global_sparsity": "pruning/test_layerwise.py::test_layerwise_recipe_fields_are_checked",
    "leave_enabled": "project/test_trust.py::test_masks_released_after_end_epoch_when_leave_enabled_is_false",
    "mask_type": "cli/test_prune_and_train.py::test_mask_the_model_cannot_hold_is_refused_before_training",
    "phased": "recipes/test_recipes.py::test_gm_pruning_refuses_phased",
    "num_grads": "recipes/test_recipes.py::test_published_pruning_fields_reach_the_parts_settings",
    "damp": "pruning/test_layer_parts.py::test_a_recipes_damp_reaches_every_part_that_factors_the_layer_hessian",
    "fisher_block_size": "recipes/test_recipes.py::test_published_pruning_fields_reach_the_parts_settings",
    "grad_sampler_kwargs": "recipes/test_recipes.py::test_published_pruning_fields_reach_the_parts_settings",
    "num_recomputations": "recipes/test_recipes.py::test_published_pruning_fields_reach_the_parts_settings",
    "selection": "recipes/test_recipes.py::test_published_pruning_fields_reach_the_parts_settings",
    "method_name": "pruning/test_layerwise.py::test_gradual_layerwise_recipe_keeps_earlier_zeros_and_reaches_each_target",
    "num_calibration_batches": "recipes/test_recipes.py::test_published_pruning_fields_reach_the_parts_settings",
    "sequential": "recipes/test_recipes.py::test_published_pruning_fields_reach_the_parts_settings",
    "learning_rate": "recipes/test_published_recipes.py::test_mfac_study_recipe_runs_unchanged",
    "weight_decay": "recipes/test_published_recipes.py::test_mfac_study_recipe_runs_unchanged",
    "param_groups": "recipes/test_recipes.py::test_a_learning_rate_function_sets_only_its_param_groups",
    "lr_func": "recipes/test_recipes.py::test_schedule_and_lr_from_recipe",
    "init_lr": "recipes/test_recipes.py::test_schedule_and_lr_from_recipe",
    "final_lr": "recipes/test_recipes.py::test_schedule_and_lr_from_recipe",
    "cycle_epochs": "recipes/test_recipes.py::test_schedule_and_lr_from_recipe",
    "hardness": "recipes/test_recipes.py::test_distillation_fields_set_the_trainers_loss",
    "temperature": "recipes/test_recipes.py::test_distillation_fields_set_the_trainers_loss",
    "distill_output_keys": "recipes/test_recipes.py::test_distillation_fields_set_the_trainers_loss",
    "teacher": "tasks/test_tasks.py::test_a_distilling_recipe_without_a_teacher_is_refused",
    "name": "cli/test_prune_and_train.py::test_recipe_selects_second_order_optimizer_and_masks_hold",
    "kwargs": "cli/test_prune_and_train.py::test_a_new_optimizer_is_one_registry_line",
    "heads": "cli/test_structured_cli.py::test_oneshot_structured_prune_writes_a_smaller_model_that_loads_back",
    "neurons": "cli/test_structured_cli.py::test_neurons_only_load_in_plain_transformers",
    "speedup": "cli/test_structured_cli.py::test_bad_structured_recipes_are_one_line_and_write_nothing",
    "bias": "recipes/test_recipes.py::test_structure_modifier_fields_reach_the_structured_part",
    "latency_batch_size": "cli/test_structured_cli.py::test_neurons_only_load_in_plain_transformers",
    "uniform": "cli/test_structured_cli.py::test_a_per_block_speedup_plan_is_met_and_loads_back",
    "layers": "cli/test_structured_cli.py::test_whole_blocks_go_first_and_the_model_loads_in_plain_transformers",
    "layer_method": "cli/test_structured_cli.py::test_whole_blocks_go_first_and_the_model_loads_in_plain_transformers",
    "attention_modules": "cli/test_structured_cli.py::test_whole_modules_go_before_heads_and_neurons_and_the_model_loads_back",
    "feed_forward_modules": "cli/test_structured_cli.py::test_whole_modules_go_before_heads_and_neurons_and_the_model_loads_back",
    "method": "recipes/test_recipes.py::test_gptq_modifier_fields_reach_the_quantize_part",
    "bits": "recipes/test_recipes.py::test_gptq_modifier_fields_reach_the_quantize_part",
    "sparsity": "cli/test_structured_cli.py::test_pruning_and_quantizing_in_one_sweep_keeps_n_m_and_the_grid",
    "embedding_bits": "pruning/test_packed.py::test_the_embedding_table_rounded_per_token_is_saved_and_loaded",
    "group_size": "recipes/test_recipes.py::test_gptq_modifier_fields_reach_the_quantize_part",
    "symmetric": "recipes/test_recipes.py::test_gptq_modifier_fields_reach_the_quantize_part",
    "actorder": "recipes/test_recipes.py::test_gptq_modifier_fields_reach_the_quantize_part",
    "static_groups": "recipes/test_recipes.py::test_gptq_modifier_fields_reach_the_quantize_part",
    "block_size": "recipes/test_recipes.py::test_gptq_modifier_fields_reach_the_quantize_part",
}


def test_gptq_modifier_fields_reach_the_quantize_part(tmp_path):
    from models import write_recipe

    from curvature.pruning.quantization import Quantize
    from curvature.recipes import load_recipe
    from curvature.recipes.schema import GPTQModifier

    text = """
modifiers:
  - !GPTQModifier
    bits: 3
    group_size: 64
    symmetric: true
    actorder: true
    static_groups: true
    damp: 0.05
    block_size: 256
    num_calibration_batches: 9
    embedding_bits: 8
    precision: float32
"""
    (mod,) = load_recipe(write_recipe(tmp_path, text)).of(GPTQModifier)
    assert mod.part() == Quantize(
        bits=3, group=64, symmetric=True, act_order=True, static_groups=True, rel_damp=0.05,
        block=256, batches=9, embedding_bits=8, precision="float32",
    )  # fmt: skip
    text = "modifiers:\n  - !GPTQModifier {method: rtn, bits: 8, group_size: null}\n"
    (mod,) = load_recipe(write_recipe(tmp_path, text)).of(GPTQModifier)
    assert mod.part() == Quantize(method="rtn", bits=8, group=None)


def test_structure_modifier_fields_reach_the_structured_part(tmp_path):
    from models import write_recipe

    from curvature.pruning import structured
    from curvature.recipes import load_recipe
    from curvature.recipes.schema import StructureModifier

    text = """
modifiers:
  - !StructureModifier
    heads: 0.25
    neurons: 0.5
    method: obs
    num_calibration_batches: 7
    damp: 0.05
    bias: false
"""
    (mod,) = load_recipe(write_recipe(tmp_path, text)).of(StructureModifier)
    assert mod.chooser() == structured.StructuredOBS(batches=7, rel_damp=0.05, bias=False)
    assert mod.targets() == {"heads": 0.25, "neurons": 0.5}
    text = text.replace("method: obs", "method: fluctuation").replace(
        "    damp: 0.05\n    bias: false\n", ""
    )
    (mod,) = load_recipe(write_recipe(tmp_path, text)).of(StructureModifier)
    assert mod.chooser() == structured.Fluctuation(batches=7)
    fisher = text.replace("method: fluctuation", "method: fisher\n    num_grads: 12\n    damp: 0.2")
    (mod,) = load_recipe(write_recipe(tmp_path, fisher)).of(StructureModifier)
    assert mod.chooser() == structured.FisherOBS(batches=7, gradients=12, rel_damp=0.2)
    # a setting the method does not have is refused, not ignored
    for method, extra, what in (
        ("taylor", "    num_grads: 12\n", "num_grads would be ignored"),
        ("magnitude", "    damp: 0.2\n", "has no damp setting"),
        ("fisher", "    bias: false\n", "has no bias setting"),
    ):
        bad = text.replace("method: fluctuation", f"method: {method}\n{extra.rstrip()}")
        with pytest.raises(ValueError, match=what):
            load_recipe(write_recipe(tmp_path, bad))


def test_every_modifier_field_acts_or_is_runtime_only():
    """Each field of each modifier has a behaviour with a test (FIELD_TESTS, checked to exist),
    or is in the logged runtime-only list; anything else a recipe may write is refused
    (``extra="forbid"``). A new field in neither list fails here."""
    from curvature.recipes.schema import MODIFIERS, RUNTIME_ONLY_FIELDS

    tests = Path(__file__).resolve().parents[1]
    for name, cls in MODIFIERS.items():
        assert cls.model_config.get("extra") == "forbid", name
        for field in cls.model_fields:
            if field == "line":  # where the modifier was written, set by the loader
                continue
            assert field in FIELD_TESTS or field in RUNTIME_ONLY_FIELDS, f"{name}.{field}"
    for field, where in FIELD_TESTS.items():
        path, test = where.split("::")
        assert f"def {test}(" in (tests / path).read_text(), (field, where)
