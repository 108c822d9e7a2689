"""The command line's options: one builder per subcommand, sharing the option groups every job
has (model and data, task, sizes, run). An option's ``dest`` is the name of the field of the
job's configuration it sets (:meth:`curvature.cli.config.DataConfig.from_args`)."""

from __future__ import annotations

import argparse

from curvature import __version__

DESCRIPTION = """\
curvature-toolkit: second-order pruning of PyTorch and Hugging Face models.

Commands:
  prune    fine-tune and prune a model with a YAML recipe (OBS, SparseGPT, OBC, Wanda,
           magnitude; unstructured, block4, N:M), then evaluate and save it with its sparsity
  train    fine-tune a model with a second-order optimizer (adahessian, mkor, mkor-h, mfac)
           or a first-order one (adamw, sgd, lamb, muon, soap), evaluate it and save it
  sweep    prune with several methods at several sparsities; table, CSV/JSON and a plot
  report   render a finished sweep or prune folder again (tables, plots, HTML)
  check    validate a recipe file and print its pruning schedule, without loading anything
  export   run a saved model in ONNX Runtime on the CPU (int8 products), checked and timed

The default model is the embedded all-MiniLM-L6-v2 and the built-in offline datasets are
bbc-news and tweet-sentiment; nothing is downloaded."""

DATA_HELP = (
    "bbc-news, tweet-sentiment, a .csv/.jsonl/.json file (text or a sentence pair, and label; "
    "SQuAD question/context/answers), a .txt corpus (one document per line), or a hub "
    "name[:config] when online"
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the option and what is wrong, where to read
    more) with exit code 2, instead of the usage block before it."""

    def error(self, message: str):
        import sys

        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def model_and_data(p) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model", default="default", help="model folder or hub name ('default': embedded MiniLM)"
    )
    g.add_argument("--data", default="bbc-news", help=DATA_HELP)
    g.add_argument(
        "--task",
        default=None,
        help="sequence-classification, question-answering, masked-lm or causal-lm (default: "
        "inferred from the data's columns and the model's config)",
    )
    g.add_argument(
        "--doc-stride",
        type=int,
        default=None,
        help="question answering: tokens shared by the windows of a long context (default a "
        "third of --max-length, at most 128)",
    )
    g.add_argument(
        "--eval-data",
        default=None,
        metavar="FILE",
        help="a separate validation file (an official dev set, e.g. SQuAD's dev-v1.1.json); "
        "then all of --data trains (default: a seeded 20%% of --data validates)",
    )
    g.add_argument(
        "--eval-stride",
        type=int,
        default=None,
        help="causal LM: tokens the perplexity window advances by (default half of --max-length)",
    )
    g.add_argument(
        "--eval-split",
        default=None,
        help="hub data: the split to evaluate on (e.g. validation_mismatched for MNLI)",
    )


def sizes(p) -> None:
    g = p.add_argument_group("sizes")
    g.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="use at most N training examples (a quick smoke run: --max-train 256 --max-eval 100)",
    )
    g.add_argument("--max-eval", type=int, default=None, help="use at most N validation examples")
    g.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    g.add_argument("--batch-size", type=int, default=16, help="training batch (default 16)")


def run_options(p, *, overwrite: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    if overwrite:
        g.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="fine-tune and prune with a recipe",
        description=(
            "Fine-tune and prune a model as the recipe says (sequence classification, question "
            "answering, masked or causal LM: --task), evaluate the dense and the pruned model, "
            "and write the pruned model (save_pretrained), metrics.json and report.md to "
            "--output. With --oneshot (or a recipe with no epochs) it prunes without training."
        ),
    )
    p.add_argument("recipe", help="recipe file (.yaml, or .md with a YAML front matter)")
    p.add_argument(
        "--output", required=True, help="output folder (must not exist unless --overwrite)"
    )
    model_and_data(p)
    sizes(p)
    g = p.add_argument_group("pruning run")
    g.add_argument(
        "--oneshot", action="store_true", help="prune to the final sparsity without training"
    )
    g.add_argument(
        "--compressed",
        action="store_true",
        help="also write OUTPUT/compressed, this toolkit's bitmask checkpoint (smaller on disk; "
        "load it with curvature.integrations.compress.load_compressed)",
    )
    g.add_argument(
        "--float-weights",
        action="store_true",
        help="save a quantized model's weights dequantized, in the model's float type, instead of "
        "packed integer codes (for grids the packed format cannot store, such as a shorter last "
        "group)",
    )
    g.add_argument(
        "--dense-baseline",
        action="store_true",
        help="also train the dense model for the same steps without pruning (an equal-budget "
        "comparison; doubles the training time)",
    )
    g.add_argument(
        "--lr", type=float, default=5e-5, help="learning rate unless the recipe sets one"
    )
    g.add_argument(
        "--teacher",
        default=None,
        help="distillation teacher: a model folder, or 'self' (the dense model before pruning)",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="NAME=VALUE",
        help="override a recipe variable",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="save a resumable checkpoint every N training steps (in .OUTPUT.checkpoints/)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its latest checkpoint (same recipe and options)",
    )
    run_options(p)


def train_parser(sub) -> None:
    from curvature.optim.registry import OPTIMIZERS, describe_defaults

    t = sub.add_parser(
        "train",
        help="fine-tune with a chosen optimizer",
        description=(
            "Fine-tune a model on its task (--task) with the chosen optimizer through the Hugging "
            "Face Trainer (AdaHessian's create_graph backward and MKOR-H's loss feed are "
            "handled), evaluate it, and write the model, tokenizer and metrics.json to --output. "
            "Learning rates default to values probed for MiniLM fine-tuning "
            "(docs/bench-optim.md): "
            + describe_defaults()
            + ". Other defaults: 1 epoch, batch 16, 128 tokens; all of them are recorded in "
            "metrics.json."
        ),
    )
    t.add_argument("--output", required=True, help="output folder")
    model_and_data(t)
    sizes(t)
    g = t.add_argument_group("optimizer")
    g.add_argument(
        "--optimizer",
        default="adamw",
        help=f"{', '.join(OPTIMIZERS.names())} (default adamw)",
    )
    g.add_argument("--lr", type=float, default=None, help="learning rate (default per optimizer)")
    g.add_argument(
        "--opt",
        dest="optimizer_kwargs",
        action="append",
        metavar="NAME=VALUE",
        help="optimizer keyword, e.g. --opt damping=1e-4 --opt gradients=32 (repeatable)",
    )
    g.add_argument("--epochs", type=float, default=1.0, help="epochs (default 1)")
    g.add_argument(
        "--max-steps", type=int, default=None, help="stop after N optimizer steps (default: none)"
    )
    g.add_argument(
        "--eval-every", type=int, default=None, help="also evaluate every N steps (learning curve)"
    )
    run_options(t)


def sweep_parser(sub) -> None:
    w = sub.add_parser(
        "sweep",
        help="measure accuracy against sparsity",
        description=(
            "Fine-tune the dense model once (cached in OUTPUT/dense), then prune it with every "
            "method at every sparsity, one-shot or with a gradual recipe, and evaluate each. "
            "Writes results.csv, results.json, results.md, the plots and report.html; a rerun "
            "resumes where it stopped."
        ),
    )
    w.add_argument("--output", required=True)
    model_and_data(w)
    sizes(w)
    g = w.add_argument_group("what is swept")
    g.add_argument(
        "--methods",
        default="obs,magnitude",
        help="comma list of registered methods: obs, obs-independent, mfac, magnitude, and the "
        "layer-wise sparsegpt, obc, wanda (calibrated on --batches batches of the training "
        "data); parts may be added with +: reconstruct (optimal kept weights for the mask), "
        "outlier (per-block targets from outlier activations), fisher (Fisher-weighted layer "
        "objective), e.g. sparsegpt+reconstruct+outlier",
    )
    g.add_argument(
        "--sparsities",
        default=None,
        help="comma list in [0, 1) (default 0.5,0.7,0.8,0.9; an N:M mask has its own, 1 - N/M)",
    )
    g.add_argument("--mask", default="unstructured", help="unstructured, block4 or N:M such as 2:4")
    g.add_argument(
        "--bits",
        default=None,
        help="bit widths of the quantizers among --methods (gptq: second-order, on the layer "
        "Hessian; rtn: round to nearest), comma list of 2, 3, 4, 8: one row each, gptq-4bit; "
        "with --sparsities above 0 or an N:M --mask, gptq prunes in the same sweep",
    )
    g.add_argument(
        "--group",
        default=None,
        help="quantizers: input columns per scale (default 128), or none for one per output channel",
    )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--oneshot", action="store_true", help="one-shot pruning (the default)")
    mode.add_argument(
        "--recipe",
        default=None,
        help="gradual pruning with this recipe (method and sparsity swept)",
    )
    g.add_argument(
        "--per-layer",
        action="store_true",
        help="every layer pruned to the target by magnitude and the Fisher methods too (default: "
        "one global threshold; the layer-wise methods are always per layer)",
    )
    g.add_argument(
        "--params",
        default=None,
        help="comma list of names or re: patterns (default __ALL_PRUNABLE__, or the recipe's)",
    )
    g.add_argument(
        "--finetune-epochs",
        type=float,
        default=1.0,
        help="dense fine-tuning before pruning (0: use the model as is)",
    )
    part_settings(w)
    m = w.add_argument_group("measurement")
    m.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat every point over N calibration (one-shot) or fine-tuning (gradual) seeds: "
        "--seed, --seed+1, ...; the table shows the mean, spread and 95%% intervals",
    )
    m.add_argument(
        "--speed-reps",
        type=int,
        default=5,
        help="timed forwards per format for each point's latency (0: do not measure)",
    )
    m.add_argument(
        "--baseline",
        default=None,
        help="a method of --methods to compare every other with at the same mask and target: "
        "paired difference and the share of its damage (loss of quality against dense) avoided, "
        "with 95%% intervals",
    )
    run_options(w, overwrite=False)


def part_settings(w) -> None:
    """The parts' settings (each applies to the methods whose parts have it)."""
    g = w.add_argument_group("part settings (default: the part's, or the recipe's)")
    g.add_argument(
        "--gradients",
        type=int,
        default=None,
        help="OBS: per-example gradients in the Fisher (default 64, or the recipe's num_grads)",
    )
    g.add_argument(
        "--batches",
        type=int,
        default=None,
        help="calibration batches of the layer-wise methods and of the reconstruct and outlier "
        "passes (default 64, or the recipe's)",
    )
    g.add_argument(
        "--block-size", type=int, default=None, help="OBS, magnitude: default 32, or the recipe's"
    )
    g.add_argument(
        "--fisher-damping",
        type=float,
        default=None,
        help="OBS: absolute damping of the Fisher, default 1e-7 or the recipe's damp",
    )
    g.add_argument(
        "--rel-damp",
        type=float,
        default=None,
        help="sparsegpt, obc: damping of the layer Hessian as a fraction of its mean diagonal "
        "(default 0.01, or the recipe's)",
    )
    g.add_argument(
        "--recomputations", type=int, default=None, help="OBS: default 1, or the recipe's"
    )
    g.add_argument(
        "--precision",
        default=None,
        help="sparsegpt, wanda, obc, gptq: float type of each calibration batch's X^T X and of "
        "the solve, float64 (default) or float32 (faster)",
    )


def report_parser(sub) -> None:
    r = sub.add_parser(
        "report",
        help="render a sweep or prune run folder as Markdown and one self-contained HTML page",
        description=(
            "Rewrite a sweep folder's tables (with 95%% intervals), PIEs, plots, report.md and "
            "report.html from its points.jsonl and predictions/, or a prune run's report.md and "
            "report.html from its metrics.json."
        ),
    )
    r.add_argument("folder")
    r.add_argument(
        "--baseline",
        default=None,
        help="compare every method with this one (default: the sweep's --baseline, if any)",
    )


def check_parser(sub) -> None:
    c = sub.add_parser(
        "check",
        help="validate a recipe",
        description="Validate a recipe and print its modifiers and pruning schedule.",
    )
    c.add_argument("recipe")
    c.add_argument("--set", dest="overrides", action="append", metavar="NAME=VALUE")


def export_parser(sub) -> None:
    e = sub.add_parser(
        "export",
        help="export a pruned or quantized model to ONNX Runtime, checked and timed on the CPU",
        description=(
            "Export the model a prune run saved (dense, structured, quantized) to ONNX Runtime: "
            "FOLDER/model.onnx and export.json with the check against PyTorch (largest logit "
            "difference, same predictions) and the latency of both at batch 16 and 1."
        ),
    )
    e.add_argument("folder", help="a folder written by curvature prune")
    e.add_argument("--output", required=True, help="folder for model.onnx and export.json")
    e.add_argument(
        "--int8",
        action="store_true",
        help="int8 matrix products (dynamic activation quantization); 8-bit per-channel codes "
        "saved by a GPTQModifier are used exactly, other layers are rounded by the runtime",
    )
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    e.add_argument("--max-length", type=int, default=128, help="tokens per timed sequence")
    e.add_argument("--no-measure", dest="measure", action="store_false", help="skip the timing")
    e.add_argument("--overwrite", action="store_true")


SUBCOMMANDS = (
    prune_parser, train_parser, sweep_parser, report_parser, check_parser, export_parser,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="curvature",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"curvature-toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser
