"""The ``curvature`` command line."""

from __future__ import annotations

import contextlib
import sys
import warnings

from curvature.cli.options import build_parser


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"expected NAME=VALUE, got {pair!r}")
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


def _metric_line(ev: dict, names: list[str]) -> str:
    return ", ".join(f"{n.replace('_', ' ')} {ev[n]:.4f}" for n in names if n in ev)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _terminate(signum, frame):
    """SIGTERM: remove the partial outputs, say so, and exit with 143 at once (an exception
    raised from a signal handler can land in a finalizer, where Python ignores it)."""
    import os

    from curvature.cli.outputs import remove_partial_outputs

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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or one error line (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    from curvature.cli.outputs import JobError
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
    with warnings.catch_warnings(), _distributed(args.command) as finished:
        warnings.showwarning = _warning_line  # one line each, not a file:line + source dump
        try:
            rc = COMMANDS[args.command](args)
            finished.append(rc)
            return rc
        except user_errors as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            hint = ""
            if args.command == "prune":
                from curvature.cli.outputs import checkpoint_dir

                if any(checkpoint_dir(args.output).glob("checkpoint-*")):
                    hint = (
                        f"; checkpoints are in {checkpoint_dir(args.output)}: rerun with --resume"
                    )
            print(f"interrupted; no output was written{hint}", file=sys.stderr)
            return 130
    return 0


def _report(args) -> int:
    from curvature.cli.report import render_folder

    md = render_folder(args.folder, baseline=args.baseline)
    print(md.read_text())
    print(f"report: {md.with_suffix('.html')}")
    return 0


@contextlib.contextmanager
def _distributed(command: str):
    """Under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1): one process group for the
    command (NCCL on CUDA, gloo on CPU), each rank pruning from its shard of the gradient batches
    and only rank 0 writing outputs. ``CURVATURE_DIST_TIMEOUT`` (seconds, default 1800) bounds
    how long a rank waits for a failed peer. The body appends its exit code to the list it is
    given: after a successful command the ranks meet at a barrier before the group is torn down
    (no rank closes its connections while a peer is still in a collective)."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    finished: list[int] = []
    if command not in ("prune", "sweep") or world <= 1 or dist.is_initialized():
        yield finished
        return
    import datetime

    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get("CURVATURE_DIST_TIMEOUT", "1800")))
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield finished
        if finished == [0]:
            dist.barrier()
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


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects a comma list of integers, got {text!r}") from None


def _sweep(args) -> int:
    from pathlib import Path

    from curvature.cli.sweep import SweepConfig, run_sweep

    cfg = SweepConfig.from_args(
        args,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        sparsities=_floats(args.sparsities, "--sparsities") if args.sparsities else None,
        params=[p.strip() for p in args.params.split(",") if p.strip()] if args.params else None,
        bits=_ints(args.bits, "--bits") if args.bits else None,
    )
    cfg.validate()  # before any folder is created
    from curvature.core.parallel import world

    if world()[0] != 0:
        # only rank 0 writes the sweep; the others run the same points in a scratch folder of
        # their own (their outputs private), seeded with rank 0's resume log so that they skip
        # the same finished points
        import shutil
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="curvature-sweep-rank-"))
        for name in ("sweep.json", "points.jsonl"):
            if (Path(args.output) / name).exists():
                shutil.copy(Path(args.output) / name, scratch / name)
        cfg.output = str(scratch)
        cfg.shared_output = str(Path(args.output).resolve())  # models are read from rank 0's
        cfg.private_outputs = True
        try:
            run_sweep(cfg)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return 0
    run_sweep(cfg)
    print((Path(args.output) / "results.md").read_text())
    print(f"plot: {Path(args.output) / 'accuracy_vs_sparsity.png'}")
    print(f"report: {Path(args.output) / 'report.html'}")
    return 0


def _train(args) -> int:
    from curvature.cli.train import TrainJob, run_train

    job = TrainJob.from_args(args, optimizer_kwargs=_overrides(args.optimizer_kwargs))
    from curvature.cli.results import metric_columns

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

    job = PruneJob.from_args(args, overrides=_overrides(args.overrides))
    from curvature.cli.results import metric_columns

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
    if m.get("before_training"):
        row("before training", m["before_training"])
    steps = f", {m['steps']} steps" if m.get("steps") else ""
    row("pruned" + steps, pruned)
    main_metric = m.get("metric")
    refs = {
        "dense_equal_budget": f"dense of the same {m.get('steps')} steps",
        "dense": "dense before pruning",
    }
    ref = m.get("compared_with", "dense")
    other = "dense" if ref == "dense_equal_budget" else "dense_equal_budget"
    for key, name in ((f"{main_metric}_delta", ref), (f"{main_metric}_delta_{other}", other)):
        if main_metric and key in pruned:
            d, lo, hi = (pruned[f"{key}{k}"] for k in ("", "_ci_low", "_ci_high"))
            noise = "within noise" if lo <= 0 <= hi else "beyond noise"
            changed = f"; {m['pies']} predictions changed" if "pies" in m and name == ref else ""
            print(
                f"pruned - {refs[name]} {main_metric}: {d:+.4f}, 95% paired interval "
                f"[{lo:+.4f}, {hi:+.4f}] ({noise}){changed}"
            )
    print(
        f"sparsity {m['sparsity']:.2%} of the pruned parameters; {m['seconds']:.0f} s; saved to "
        f"{args.output} (report.html)"
    )
    return 0


def _export(args) -> int:
    from pathlib import Path

    from curvature.cli.outputs import JobError, atomic_output, check_output
    from curvature.integrations.runtime import export

    out = Path(args.output)
    check_output(out, args.overwrite)
    if args.threads is not None and args.threads < 1:
        raise JobError(f"--threads must be >= 1, got {args.threads}")
    if args.max_length < 1:
        raise JobError(f"--max-length must be >= 1, got {args.max_length}")
    if not Path(args.folder).is_dir():
        raise JobError(f"{args.folder}: no such folder; give a folder written by curvature prune")
    try:
        with atomic_output(out) as tmp:
            info = export(
                args.folder, tmp, int8=args.int8, threads=args.threads, length=args.max_length,
                measure=args.measure,
            )  # fmt: skip
    except ValueError as exc:
        raise JobError(str(exc)) from None
    c = info["check"]
    print(
        f"onnxruntime model {info['bytes'] / 1e6:.1f} MB; largest logit difference from PyTorch "
        f"{c['max_abs_difference']:.3g} (largest logit {c['max_abs_logit']:.3g}), same "
        f"prediction {c['same_prediction']:.0%}"
    )
    for row in info.get("latency", []):
        print(
            f"batch {row['batch_size']} x {row['sequence_length']}, {info['threads']} threads: "
            f"PyTorch {row['pytorch_ms']:.1f} ms, onnxruntime {row['onnxruntime_ms']:.1f} ms "
            f"({row['speedup']:.2f}x)"
        )
    print(f"saved to {out} (model.onnx, export.json)")
    return 0


COMMANDS = {
    "sweep": _sweep, "report": _report, "check": _check, "prune": _prune, "train": _train,
    "export": _export,
}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
