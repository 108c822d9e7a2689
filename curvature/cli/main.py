"""The ``curvature`` command line."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

from curvature import __version__

DESCRIPTION = """\
curvature-toolkit: second-order pruning of PyTorch and Hugging Face models.

Commands:
  prune    fine-tune and prune a classifier with a YAML recipe (OBS, magnitude; unstructured,
           block4, N:M), then evaluate and save it with its sparsity intact
  train    fine-tune a classifier with a second-order optimizer (adahessian, mkor, mkor-h, mfac)
           or a first-order one (adamw, sgd, lamb), evaluate it and save it
  sweep    prune with several methods at several sparsities; table, CSV/JSON and a plot
  report   render a finished sweep folder again (table and plot)
  check    validate a recipe file and print its pruning schedule, without loading anything

The default model is the embedded all-MiniLM-L6-v2 and the built-in offline datasets are
bbc-news and tweet-sentiment; nothing is downloaded."""


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"error: expected NAME=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = _yaml_value(v)
    return out


def _yaml_value(text: str):
    """A command-line value read as a YAML scalar or list (``false``, ``[a, b]``, ``1e-4``)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _task_arguments(p) -> None:
    p.add_argument(
        "--task",
        default=None,
        help="sequence-classification, question-answering, masked-lm or causal-lm (default: "
        "inferred from the data's columns and the model's config)",
    )
    p.add_argument(
        "--doc-stride",
        type=int,
        default=None,
        help="question answering: tokens shared by the windows of a long context (default a "
        "third of --max-length, at most 128)",
    )
    p.add_argument(
        "--eval-data",
        default=None,
        metavar="FILE",
        help="a separate validation file (an official dev set, e.g. SQuAD's dev-v1.1.json); "
        "then all of --data trains (default: a seeded 20%% of --data validates)",
    )
    p.add_argument(
        "--eval-stride",
        type=int,
        default=None,
        help="causal LM: tokens the perplexity window advances by (default half of --max-length)",
    )
    p.add_argument(
        "--eval-split",
        default=None,
        help="hub data: the split to evaluate on (e.g. validation_mismatched for MNLI)",
    )


def _metric_line(ev: dict, names: list[str]) -> str:
    return ", ".join(f"{n.replace('_', ' ')} {ev[n]:.4f}" for n in names if n in ev)


def build_parser() -> argparse.ArgumentParser:
    from curvature.optim.registry import describe_defaults as describe

    parser = argparse.ArgumentParser(
        prog="curvature",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"curvature-toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "prune",
        help="fine-tune and prune with a recipe",
        description=(
            "Fine-tune and prune a model as the recipe says (sequence classification, question "
            "answering, masked or causal LM: --task), evaluate the dense and the "
            "pruned model, and write the pruned model (save_pretrained), metrics.json and report.md "
            "to --output. With --oneshot (or a recipe with no epochs) it prunes without training."
        ),
    )
    p.add_argument("recipe", help="recipe file (.yaml, or .md with a YAML front matter)")
    p.add_argument(
        "--model", default="default", help="model folder or hub name ('default': embedded MiniLM)"
    )
    p.add_argument(
        "--data",
        default="bbc-news",
        help="bbc-news, tweet-sentiment, a .csv/.jsonl/.json file (text or a sentence pair, and "
        "label; SQuAD question/context/answers), a .txt corpus (one document per line), or a hub "
        "name[:config] when online",
    )
    _task_arguments(p)
    p.add_argument(
        "--output", required=True, help="output folder (must not exist unless --overwrite)"
    )
    p.add_argument(
        "--oneshot", action="store_true", help="prune to the final sparsity without training"
    )
    p.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="use at most N training examples (a quick smoke run: --max-train 256 --max-eval 100)",
    )
    p.add_argument("--max-eval", type=int, default=None, help="use at most N validation examples")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch (default 16)")
    p.add_argument(
        "--compressed",
        action="store_true",
        help="also write OUTPUT/compressed, this toolkit's bitmask checkpoint (smaller on disk; "
        "load it with curvature.integrations.compress.load_compressed)",
    )
    p.add_argument(
        "--dense-baseline",
        action="store_true",
        help="also train the dense model for the same steps without pruning (an equal-budget "
        "comparison; doubles the training time)",
    )
    p.add_argument(
        "--lr", type=float, default=5e-5, help="learning rate unless the recipe sets one"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--teacher",
        default=None,
        help="distillation teacher: a model folder, or 'self' (the dense model before pruning)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="NAME=VALUE",
        help="override a recipe variable",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="save a resumable checkpoint every N training steps (in .OUTPUT.checkpoints/)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its latest checkpoint (same recipe and options)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    t = sub.add_parser(
        "train",
        help="fine-tune with a chosen optimizer",
        description=(
            "Fine-tune a model on its task (--task) with the chosen optimizer through the Hugging Face "
            "Trainer (AdaHessian's create_graph backward and MKOR-H's loss feed are handled), "
            "evaluate it, and write the model, tokenizer and metrics.json to --output. Learning "
            "rates default to values probed for MiniLM fine-tuning (docs/bench-optim.md): "
            + describe()
            + ". Other defaults: 1 epoch, batch 16, 128 tokens; all of them are recorded in "
            "metrics.json."
        ),
    )
    t.add_argument(
        "--optimizer",
        default="adamw",
        help="adamw, adahessian, mkor, mkor-h, mfac, sgd or lamb (default adamw)",
    )
    t.add_argument("--model", default="default", help="model folder or 'default' (MiniLM)")
    t.add_argument(
        "--data",
        default="bbc-news",
        help="bbc-news, tweet-sentiment, a .csv/.jsonl/.json/.txt file, or a hub name[:config]",
    )
    _task_arguments(t)
    t.add_argument("--output", required=True, help="output folder")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default per optimizer)")
    t.add_argument(
        "--opt",
        dest="optimizer_kwargs",
        action="append",
        metavar="NAME=VALUE",
        help="optimizer keyword, e.g. --opt damping=1e-4 --opt gradients=32 (repeatable)",
    )
    t.add_argument("--epochs", type=float, default=1.0, help="epochs (default 1)")
    t.add_argument(
        "--max-steps", type=int, default=None, help="stop after N optimizer steps (default: none)"
    )
    t.add_argument("--batch-size", type=int, default=16, help="training batch (default 16)")
    t.add_argument("--max-train", type=int, default=None, help="use at most N training examples")
    t.add_argument("--max-eval", type=int, default=None, help="use at most N validation examples")
    t.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    t.add_argument(
        "--eval-every", type=int, default=None, help="also evaluate every N steps (learning curve)"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--no-progress", action="store_true")

    w = sub.add_parser(
        "sweep",
        help="measure accuracy against sparsity",
        description=(
            "Fine-tune the dense model once (cached in OUTPUT/dense), then prune it with every method at "
            "every sparsity, one-shot or with a gradual recipe, and evaluate each. Writes results.csv, "
            "results.json, results.md and accuracy_vs_sparsity.png; a rerun resumes where it stopped."
        ),
    )
    w.add_argument("--model", default="default")
    w.add_argument("--data", default="bbc-news")
    w.add_argument(
        "--task",
        default=None,
        help="sequence-classification, question-answering, masked-lm or causal-lm (default: "
        "inferred); the table and plot show the task's metric",
    )
    w.add_argument(
        "--methods",
        default="obs,magnitude",
        help="comma list of registered methods: obs, obs-independent, mfac, magnitude, and the "
        "layer-wise sparsegpt, obc, wanda (calibrated on --batches batches of the training data); "
        "parts may be added with +: reconstruct (optimal kept weights for the mask), outlier "
        "(per-block targets from outlier activations), fisher (Fisher-weighted layer objective), "
        "e.g. sparsegpt+reconstruct+outlier",
    )
    w.add_argument(
        "--per-layer",
        action="store_true",
        help="every layer pruned to the target by magnitude and the Fisher methods too (default: "
        "one global threshold; the layer-wise methods are always per layer)",
    )
    w.add_argument(
        "--sparsities",
        default=None,
        help="comma list in [0, 1) (default 0.5,0.7,0.8,0.9; an N:M mask has its own, 1 - N/M)",
    )
    w.add_argument("--mask", default="unstructured", help="unstructured, block4 or N:M such as 2:4")
    mode = w.add_mutually_exclusive_group()
    mode.add_argument("--oneshot", action="store_true", help="one-shot pruning (the default)")
    mode.add_argument(
        "--recipe",
        default=None,
        help="gradual pruning with this recipe (method and sparsity are swept)",
    )
    w.add_argument(
        "--params",
        default=None,
        help="comma list of names or re: patterns (default __ALL_PRUNABLE__, or the recipe's)",
    )
    w.add_argument("--output", required=True)
    w.add_argument(
        "--finetune-epochs",
        type=float,
        default=1.0,
        help="dense fine-tuning before pruning (0: use the model as is)",
    )
    w.add_argument("--max-train", type=int, default=None)
    w.add_argument("--max-eval", type=int, default=None)
    w.add_argument("--max-length", type=int, default=128)
    w.add_argument(
        "--gradients",
        type=int,
        default=None,
        help="OBS: per-example gradients in the Fisher (default 64, or the recipe's num_grads)",
    )
    w.add_argument(
        "--batches",
        type=int,
        default=None,
        help="layer-wise methods: calibration batches (default 64, or the recipe's)",
    )
    w.add_argument(
        "--block-size", type=int, default=None, help="OBS, magnitude: default 32, or the recipe's"
    )
    w.add_argument(
        "--fisher-damping",
        type=float,
        default=None,
        help="OBS: absolute damping of the Fisher, default 1e-7 or the recipe's damp",
    )
    w.add_argument(
        "--rel-damp",
        type=float,
        default=None,
        help="sparsegpt, obc: damping of the layer Hessian as a fraction of its mean diagonal "
        "(default 0.01, or the recipe's)",
    )
    w.add_argument(
        "--recomputations", type=int, default=None, help="OBS: default 1, or the recipe's"
    )
    w.add_argument("--seed", type=int, default=0)
    w.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat every point over N calibration (one-shot) or fine-tuning (gradual) seeds: "
        "--seed, --seed+1, ...; the table shows the mean, spread and 95%% intervals",
    )
    w.add_argument(
        "--speed-reps",
        type=int,
        default=5,
        help="timed forwards per format for each point's latency (0: do not measure)",
    )
    w.add_argument(
        "--baseline",
        default=None,
        help="a method of --methods to compare every other with at the same mask and target: "
        "paired difference and the share of its damage (loss of quality against dense) avoided, "
        "with 95%% intervals",
    )
    w.add_argument("--no-progress", action="store_true")

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

    c = sub.add_parser(
        "check",
        help="validate a recipe",
        description="Validate a recipe and print its modifiers and pruning schedule.",
    )
    c.add_argument("recipe")
    c.add_argument("--set", dest="overrides", action="append", metavar="NAME=VALUE")
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _terminate(signum, frame):
    """SIGTERM: remove the partial outputs, say so, and exit with 143 at once (an exception
    raised from a signal handler can land in a finalizer, where Python ignores it)."""
    import os

    from curvature.cli.jobs import remove_partial_outputs

    removed = remove_partial_outputs()
    what = "unfinished output removed" if removed else "stopped"
    print(f"terminated; {what}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """The ``curvature`` command; returns the exit code. SIGTERM is handled like Ctrl-C while
    it runs (partial outputs removed), and the previous handler is restored afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from curvature.cli.jobs import JobError
    from curvature.recipes import RecipeError
    from curvature.tasks.data import DataError
    from curvature.tasks.models import ModelNotFoundError

    user_errors = (
        RecipeError,
        DataError,
        ModelNotFoundError,
        JobError,
        MemoryError,
        ValueError,
        FileNotFoundError,
    )
    with warnings.catch_warnings(), _distributed(args.command):
        warnings.showwarning = _warning_line  # one line each, not a file:line + source dump
        try:
            if args.command == "sweep":
                return _sweep(args)
            if args.command == "report":
                from curvature.cli.report import render_folder

                md = render_folder(args.folder, baseline=args.baseline)
                print(md.read_text())
                print(f"report: {md.with_suffix('.html')}")
                return 0
            if args.command == "check":
                return _check(args)
            if args.command == "prune":
                return _prune(args)
            if args.command == "train":
                return _train(args)
        except user_errors as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            hint = ""
            if args.command == "prune":
                from curvature.cli.jobs import checkpoint_dir

                if any(checkpoint_dir(args.output).glob("checkpoint-*")):
                    hint = (
                        f"; checkpoints are in {checkpoint_dir(args.output)}: rerun with --resume"
                    )
            print(f"interrupted; no output was written{hint}", file=sys.stderr)
            return 130
    return 0


@contextlib.contextmanager
def _distributed(command: str):
    """Under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1): one process group for the
    command (NCCL on CUDA, gloo on CPU), each rank pruning from its shard of the gradient batches
    and only rank 0 writing outputs. ``CURVATURE_DIST_TIMEOUT`` (seconds, default 1800) bounds
    how long a rank waits for a failed peer."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if command not in ("prune", "sweep") or world <= 1 or dist.is_initialized():
        yield
        return
    import datetime

    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get("CURVATURE_DIST_TIMEOUT", "1800")))
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _check(args) -> int:
    from curvature.recipes import load_recipe
    from curvature.recipes.schema import _Pruning

    recipe = load_recipe(args.recipe, _overrides(args.overrides))
    print(f"{args.recipe}: valid, {len(recipe.modifiers)} modifiers, {recipe.num_epochs:g} epochs")
    for m in recipe.modifiers:
        fields = m.model_dump(exclude_defaults=True)
        print(f"  line {m.line}: {type(m).__name__} {fields}")
    for m in recipe.of(_Pruning):
        for final, patterns in m.finals().items():
            sched = " ".join(f"{e:g}:{m.target_at(x, final):.3f}" for e, x in m.progress())
            whom = f" for {len(patterns)} parameter entries" if len(m.finals()) > 1 else ""
            print(f"  {type(m).__name__} schedule{whom} (epoch:sparsity): {sched}")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects a comma list of numbers, got {text!r}") from None


def _sweep(args) -> int:
    from pathlib import Path

    from curvature.cli.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(
        output=args.output,
        model=args.model,
        data=args.data,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        sparsities=_floats(args.sparsities, "--sparsities") if args.sparsities else None,
        mask=args.mask,
        recipe=args.recipe,
        params=[p.strip() for p in args.params.split(",") if p.strip()] if args.params else None,
        finetune_epochs=args.finetune_epochs,
        max_train=args.max_train,
        max_eval=args.max_eval,
        max_length=args.max_length,
        gradients=args.gradients,
        batches=args.batches,
        block_size=args.block_size,
        fisher_damping=args.fisher_damping,
        rel_damp=args.rel_damp,
        recomputations=args.recomputations,
        seed=args.seed,
        progress=not args.no_progress,
        task=args.task,
        per_layer=args.per_layer,
        seeds=args.seeds,
        speed_reps=args.speed_reps,
        baseline=args.baseline,
    )
    cfg.validate()  # before any folder is created
    from curvature.core.parallel import world

    if world()[0] != 0:
        # only rank 0 writes the sweep; the others run the same points in a scratch folder,
        # seeded with rank 0's resume log so that they skip the same finished points
        import shutil
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="curvature-sweep-rank-"))
        for name in ("sweep.json", "points.jsonl"):
            if (Path(args.output) / name).exists():
                shutil.copy(Path(args.output) / name, scratch / name)
        cfg.output = str(scratch)
        cfg.shared_output = str(Path(args.output).resolve())  # models are read from rank 0's
        from curvature.cli import jobs

        jobs.PRIVATE_OUTPUTS = True
        try:
            run_sweep(cfg)
        finally:
            jobs.PRIVATE_OUTPUTS = False
            shutil.rmtree(scratch, ignore_errors=True)
        return 0
    run_sweep(cfg)
    print((Path(args.output) / "results.md").read_text())
    print(f"plot: {Path(args.output) / 'accuracy_vs_sparsity.png'}")
    print(f"report: {Path(args.output) / 'report.html'}")
    return 0


def _train(args) -> int:
    from curvature.cli.train import TrainJob, run_train

    kwargs = _overrides(args.optimizer_kwargs)
    job = TrainJob(
        optimizer=args.optimizer,
        model=args.model,
        data=args.data,
        output=args.output,
        lr=args.lr,
        optimizer_kwargs=kwargs,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_train=args.max_train,
        max_eval=args.max_eval,
        max_length=args.max_length,
        eval_every=args.eval_every,
        task=args.task,
        doc_stride=args.doc_stride,
        eval_split=args.eval_split,
        eval_data=args.eval_data,
        eval_stride=args.eval_stride,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    from curvature.cli.jobs import metric_columns

    m = run_train(job)
    v = m["validation"]
    names = metric_columns({"metric": m["metric"], "pruned": v})
    print()
    print(f"optimizer {m['optimizer']} (lr {m['lr']:g}, {m['optimizer_kwargs']})")
    for h in m["curve"]:
        print(f"  step {h['step']:>5}  {_metric_line(h, names)}")
    print(
        f"validation {_metric_line(v, names)} after {m['steps']} steps; "
        f"{m['seconds_per_step']:.2f} s/step; saved to {args.output}"
    )
    return 0


def _prune(args) -> int:
    from curvature.cli.jobs import PruneJob, run_prune

    job = PruneJob(
        recipe=args.recipe,
        model=args.model,
        data=args.data,
        output=args.output,
        oneshot=args.oneshot,
        max_train=args.max_train,
        max_eval=args.max_eval,
        max_length=args.max_length,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        teacher=args.teacher,
        overrides=_overrides(args.overrides),
        overwrite=args.overwrite,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        dense_baseline=args.dense_baseline,
        compressed=args.compressed,
        task=args.task,
        doc_stride=args.doc_stride,
        eval_split=args.eval_split,
        eval_data=args.eval_data,
        eval_stride=args.eval_stride,
    )
    from curvature.cli.jobs import metric_columns

    m = run_prune(job)
    dense, pruned = m.get("dense"), m["pruned"]
    names = metric_columns(m)

    def row(label, ev):
        print(f"{label:24}" + "".join(f"{ev[n]:>14.4f}" for n in names))

    print()
    print(f"{'':24}" + "".join(f"{n:>14}" for n in names))
    if dense:
        row("dense (before pruning)", dense)
    base = m.get("dense_equal_budget")
    if base:
        row(f"dense, {base['steps']} steps", base)
    steps = f", {m['steps']} steps" if m.get("steps") else ""
    row("pruned" + steps, pruned)
    main_metric = m.get("metric")
    if main_metric and f"{main_metric}_delta" in pruned:
        d, lo, hi = (pruned[f"{main_metric}_delta{k}"] for k in ("", "_ci_low", "_ci_high"))
        noise = "within noise" if lo <= 0 <= hi else "beyond noise"
        print(
            f"pruned - dense {main_metric}: {d:+.4f}, 95% paired interval [{lo:+.4f}, {hi:+.4f}] "
            f"({noise}); {m.get('pies', 0)} predictions changed" if "pies" in m else
            f"pruned - dense {main_metric}: {d:+.4f}, 95% paired interval [{lo:+.4f}, {hi:+.4f}] "
            f"({noise})"
        )  # fmt: skip
    print(
        f"sparsity {m['sparsity']:.2%} of the pruned parameters; {m['seconds']:.0f} s; saved to "
        f"{args.output} (report.html)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
