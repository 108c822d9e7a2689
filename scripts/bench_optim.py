"""Benchmark the optimizers against AdamW: cost per step, and a short fine-tuning comparison.

Part 1 (cost): time per optimizer step (forward + backward + step, with AdaHessian's
create_graph backward) and peak resident memory, relative to AdamW on the same model and batch:
a small MLP (784-512-512-10, batch 128) and the default MiniLM (batch 16, 128 tokens). Every
measurement runs in a fresh subprocess so peak memory is the optimizer's own.

Part 2 (quality): fine-tune MiniLM on bbc-news for ``--steps`` steps with each optimizer and each
seed (`curvature train` with its default learning rates), evaluating every ``--eval-every``
steps: validation accuracy after N steps and steps to reach ``--target`` accuracy.

    python scripts/bench_optim.py                    # both parts (about 40 min on 2 CPU cores)
    python scripts/bench_optim.py --part cost --quick

Timings on a shared machine are noisy; the ratios to AdamW measured in the same run are the
figures to read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

OPTIMIZERS = ["adamw", "adahessian", "mkor", "mkor-h", "mfac"]
# the comparison against what users pick today (--part compare)
COMPARED = ["adamw", "muon", "soap", "adahessian", "mfac", "mkor"]
SETUPS = {
    # MiniLM classifying BBC articles: batch 16 of 64 tokens, judged by validation accuracy
    "minilm": {
        "job": {"max_length": 64, "batch_size": 16},
        "metric": "accuracy",
        "steps": 40,
        "eval_every": 10,
        "max_eval": 200,
    },
    # the embedded decoder (SmolLM2-135M) fine-tuned as a language model on BBC text: batch 4 of
    # 64 tokens, judged by validation loss (mean next-token cross-entropy)
    "smollm2": {
        "job": {"model": "smollm2", "task": "causal-lm", "max_length": 64, "batch_size": 4},
        "metric": "loss",
        "steps": 10,
        "eval_every": 10,
        "max_eval": 6,
    },
}
# cost rows only: AdaHessian refreshing its Hessian estimate every 2nd / 4th step, and estimating
# it on a quarter / half of each batch
COST_ROWS = OPTIMIZERS + [
    "adahessian:update_each=2",
    "adahessian:update_each=4",
    "adahessian:hessian_batch=0.5",
    "adahessian:hessian_batch=0.25",
]


def _number(text: str):
    return float(text) if "." in text else int(text)


def _cost_one(row: str, model_kind: str, steps: int) -> dict:
    import torch

    name, _, extra = row.partition(":")
    extra = dict(kv.split("=") for kv in extra.split(",")) if extra else {}

    from curvature.cli.utils import peak_memory_bytes, reset_peak_memory
    from curvature.optim import build_optimizer, needs_create_graph
    from curvature.optim.registry import get as optimizer_row

    torch.manual_seed(0)
    if model_kind == "mlp":
        model = torch.nn.Sequential(
            torch.nn.Linear(784, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        )
        x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
        rows = len(y)

        def loss_fn(n=None):
            return torch.nn.functional.cross_entropy(model(x[:n]), y[:n])

        lr, kwargs = optimizer_row(name).lr, dict(optimizer_row(name).defaults)
        kwargs = {k: v for k, v in kwargs.items() if k != "exclude"}
        if name == "mfac":
            kwargs["gradients"] = 64
        kwargs = kwargs | {k: _number(v) for k, v in extra.items()}
    else:
        from curvature.tasks.models import load_classifier

        model, _ = load_classifier("default", 5)
        ids = torch.randint(1000, 20000, (16, 128))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        labels = torch.randint(0, 5, (16,))
        rows = len(labels)

        def loss_fn(n=None):
            return model(**{k: v[:n] for k, v in batch.items()}, labels=labels[:n]).loss

        lr, kwargs = optimizer_row(name).lr, dict(optimizer_row(name).defaults)
        kwargs = kwargs | {k: _number(v) for k, v in extra.items()}
    opt = build_optimizer(name, model, lr=lr, **kwargs)
    reset_peak_memory()
    base = peak_memory_bytes()

    def one_step():
        opt.zero_grad()
        if getattr(opt, "needs_hessian_closure", False):  # the estimate on the first share
            share = max(1, math.ceil(opt.hessian_batch * rows))
            opt.set_hessian_closure(lambda: loss_fn(share))
        loss = loss_fn()
        loss.backward(create_graph=needs_create_graph(opt))
        if hasattr(opt, "observe_loss"):
            opt.observe_loss(loss)
        opt.step()

    # warm-up: allocate state, first factor updates; M-FAC until its window is full (the steady
    # state: every row of the window is read on every step)
    for _ in range(kwargs.get("gradients", 0) + 2 if name == "mfac" else 2):
        one_step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t)
    peak = peak_memory_bytes()
    return {
        "optimizer": row,
        "model": model_kind,
        # the mean, not the median: with update_each > 1 the steps alternate between two costs
        "seconds_per_step": statistics.mean(times),
        "peak_bytes": peak,
        "peak_over_start_bytes": (peak - base) if peak and base else None,
    }


def _quality_one(
    name: str,
    seed: int,
    steps: int,
    eval_every: int,
    max_eval: int,
    lr: float,
    threads: int,
    setup: str = "minilm",
) -> dict:
    from curvature.cli.train import TrainJob, run_train

    base, _, extra = name.partition(":")  # "adahessian:hessian_batch=0.25"
    kwargs = {k: _number(v) for k, v in (kv.split("=") for kv in extra.split(",") if kv)}
    m = run_train(
        TrainJob(
            optimizer=base,
            optimizer_kwargs=kwargs or None,
            output=None,
            lr=lr if lr > 0 else None,
            max_steps=steps,
            max_eval=max_eval,
            eval_every=eval_every,
            seed=seed,
            progress=False,
            threads=threads or None,
            **SETUPS[setup]["job"],
        )
    )
    return {k: m[k] for k in ("lr", "seed", "steps", "seconds_per_step", "curve")} | {
        "optimizer": name,
        **{k: m["validation"][k] for k in ("accuracy", "perplexity") if k in m["validation"]},
        "loss": m["validation"]["loss"],
        "peak_bytes": m["peak_memory_bytes"],
        "switched_to_base_at_step": m.get("switched_to_base_at_step"),
    }


def part_compare(
    setup: str,
    names: list[str],
    seeds: list[int],
    threads: int,
    json_path: str,
    lr_from: str | None = None,
):
    """Tune each optimizer's learning rate by one rule (three runs on the first seed: its default
    / 3, default, default x 3; while the best is at an end of the grid, one more step beyond it,
    at most :data:`EXTEND` times), then run the other seeds at the best one. With ``lr_from``
    (another setup's results), take each optimizer's learning rate chosen there instead."""
    from curvature.optim.registry import get as optimizer_row

    chosen = {}
    if lr_from:
        prev = json.load(open(lr_from))
        chosen = {n: _best_lr(prev, n, seeds[0]) for n in names}

    spec = SETUPS[setup]
    lower = spec["metric"] == "loss"
    out = {"setup": setup, "spec": spec, "runs": {}}
    if os.path.exists(json_path):
        out = json.load(open(json_path))  # resume

    def run(name, seed, lr):
        key = f"{name}|{seed}|{lr:g}"
        if key not in out["runs"]:
            out["runs"][key] = _sub(
                ["quality", name, str(seed), str(spec["steps"]), str(spec["eval_every"]),
                 str(spec["max_eval"]), str(lr), str(threads), setup]
            )  # fmt: skip
            json.dump(out, open(json_path, "w"), indent=1)
            r = out["runs"][key]
            print(f"{setup} {key}: {r.get(spec['metric'], r.get('error'))}", flush=True)
        return out["runs"][key]

    if chosen:  # no tuning here: every optimizer's first seed first, then the next seeds
        for s in seeds:
            for name in names:
                if chosen.get(name):
                    run(name, s, chosen[name])
        return out
    for name in names:
        d = optimizer_row(name).lr
        grid = [d / 3, d, d * 3]
        probes = {lr: run(name, seeds[0], lr) for lr in grid}
        for _ in range(EXTEND):
            ok = {lr: r for lr, r in probes.items() if "error" not in r}
            if not ok:
                break
            best = (min if lower else max)(ok, key=lambda lr: ok[lr][spec["metric"]])
            if best == max(probes):
                nxt = best * 3
            elif best == min(probes):
                nxt = best / 3
            else:
                break
            probes[nxt] = run(name, seeds[0], nxt)
        best = _best_lr(out, name, seeds[0])
        if best is None:
            continue
        for s in seeds[1:]:
            run(name, s, best)
    return out


EXTEND = 2


def _best_lr(out: dict, name: str, seed: int):
    """The learning rate of ``name``'s best run on ``seed`` in ``out`` (None if all failed)."""
    metric = SETUPS[out["setup"]]["metric"]
    ok = {
        float(k.split("|")[2]): r
        for k, r in out["runs"].items()
        if k.split("|")[0] == name and k.split("|")[1] == str(seed) and "error" not in r
    }
    if not ok:
        return None
    return (min if metric == "loss" else max)(ok, key=lambda lr: ok[lr][metric])


def compare_tables(out: dict, names: list[str], seeds: list[int]) -> list[str]:
    spec = SETUPS[out["setup"]]
    metric, lower = spec["metric"], spec["metric"] == "loss"
    lines = [
        f"| optimizer | lr probes (seed {seeds[0]}: {metric}) | chosen lr | {metric} after "
        f"{spec['steps']} steps, mean +- std over {len(seeds)} seeds | per seed | s/step | "
        f"train s to the end |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        runs = {k: r for k, r in out["runs"].items() if k.split("|")[0] == name}
        probes = {
            float(k.split("|")[2]): r for k, r in runs.items() if k.split("|")[1] == str(seeds[0])
        }
        ok = {lr: r for lr, r in probes.items() if "error" not in r}
        if not ok:
            err = next(iter(probes.values()), {}).get("error", "not run")
            lines.append(f"| {name} | error: {err} | | | | | |")
            continue
        best = (min if lower else max)(ok, key=lambda lr: ok[lr][metric])
        finals = [ok[best]] + [
            r for k, r in runs.items()
            if k.split("|")[1] != str(seeds[0]) and float(k.split("|")[2]) == best
            and "error" not in r
        ]  # fmt: skip
        vals = [r[metric] for r in finals]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        probe_s = ", ".join(
            f"{lr:g}: {r[metric]:.3f}" if "error" not in r else f"{lr:g}: error"
            for lr, r in sorted(probes.items())
        )
        lines.append(
            f"| {name} | {probe_s} | {best:g} | {statistics.mean(vals):.4f} +- {sd:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in vals)} | "
            f"{statistics.mean(r['seconds_per_step'] for r in finals):.2f} | "
            f"{statistics.mean(r['curve'][-1]['seconds'] for r in finals):.0f} |"
        )
    return lines


def plot_compare(out: dict, names: list[str], seeds: list[int], path: str) -> None:
    """The chosen run's metric against optimizer steps and against training seconds (mean over
    seeds; band min-max)."""
    from matplotlib.figure import Figure

    spec = SETUPS[out["setup"]]
    metric, lower = spec["metric"], spec["metric"] == "loss"
    fig = Figure(figsize=(11, 4.2))
    ax_step, ax_time = fig.subplots(1, 2)
    for name in names:
        runs = {
            k: r for k, r in out["runs"].items() if k.startswith(name + "|") and "error" not in r
        }
        probes = {
            float(k.split("|")[2]): r for k, r in runs.items() if k.split("|")[1] == str(seeds[0])
        }
        if not probes:
            continue
        best = (min if lower else max)(probes, key=lambda lr: probes[lr][metric])
        finals = [r for k, r in runs.items() if float(k.split("|")[2]) == best]
        n = min(len(r["curve"]) for r in finals)
        xs = [finals[0]["curve"][i]["step"] for i in range(n)]
        ts = [statistics.mean(r["curve"][i]["seconds"] for r in finals) for i in range(n)]
        ys = [[r["curve"][i][metric] for r in finals] for i in range(n)]
        mean = [statistics.mean(v) for v in ys]
        for ax, x in ((ax_step, xs), (ax_time, ts)):
            (line,) = ax.plot(x, mean, marker="o", label=f"{name} (lr {best:g})")
            ax.fill_between(x, [min(v) for v in ys], [max(v) for v in ys], alpha=0.15,
                            color=line.get_color())  # fmt: skip
    what = {"minilm": "MiniLM on bbc-news", "smollm2": "SmolLM2-135M, language modelling on BBC"}
    for ax, xl in ((ax_step, "optimizer step"), (ax_time, "training seconds (2-core CPU)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        ax.set_title(f"{what[out['setup']]}, {len(seeds)} seeds (band: min-max)", fontsize=9)
    ax_step.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _sub(args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _environment() -> dict:
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads()}


def _gb(b) -> str:
    return f"{b / 2**30:.2f}" if b else "n/a"


def cost_table(rows: list[dict]) -> list[str]:
    """The cost table from ``part_cost``'s raw rows (``scripts/tables.py optim-cost``)."""
    lines = [
        "| model | optimizer | s/step | x AdamW | peak RSS GiB | peak growth over start GiB |",
        "|---|---|---|---|---|---|",
    ]
    ref = {r["model"]: r["seconds_per_step"] for r in rows if r.get("optimizer") == "adamw"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['optimizer']} | error: {r['error']} | | | |")
            continue
        ratio = r["seconds_per_step"] / ref[r["model"]] if r["model"] in ref else float("nan")
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['seconds_per_step']:.3f} | {ratio:.2f} | "
            f"{_gb(r['peak_bytes'])} | {_gb(r['peak_over_start_bytes'])} |"
        )
    return lines


def part_cost(quick: bool) -> tuple[list[str], list[dict]]:
    # whole multiples of update_each = 4, so that the means are the long-run cost
    rows = []
    for model_kind, steps in (("mlp", 8 if quick else 40), ("minilm", 4 if quick else 8)):
        for name in COST_ROWS:
            r = _sub(["cost", name, model_kind, str(steps)])
            rows.append({"optimizer": name, "model": model_kind, "steps": steps, **r})
            print("\n".join(cost_table(rows)[-1:]), flush=True)
    return cost_table(rows), rows


def part_quality(
    names, seeds, steps, eval_every, target, max_eval, lrs: dict, threads: int, plot: str | None
):
    runs = {}
    for name in names:
        lr = lrs.get(name, 0.0)
        runs[name] = [
            _sub(["quality", name, str(s), str(steps), str(eval_every), str(max_eval), str(lr),
                  str(threads)])
            for s in seeds
        ]  # fmt: skip
        ok = [r for r in runs[name] if "error" not in r]
        accs = ", ".join(f"{r['accuracy']:.3f}" for r in ok)
        print(f"{name}: accuracy after {steps} steps per seed: {accs}", flush=True)
    lines = quality_table(runs, steps, target)
    if plot:
        _plot_curves(runs, plot, steps)
        lines.append(f"\nLearning curves: {plot}")
    return lines, runs


def quality_table(runs: dict, steps: int, target: float) -> list[str]:
    """The fine-tuning table of ``runs`` (``{optimizer: [run per seed]}``)."""
    from curvature.cli.train import steps_to_reach

    lines = [
        f"| optimizer | lr | accuracy after {steps} steps (mean +- std; per seed) | steps to "
        f"{target:.0%} (per seed) | s/step | MKOR-H switch step |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {name} | | error: {rs[0]['error']} | | | |")
            continue
        accs = [r["accuracy"] for r in ok]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        reach = [steps_to_reach(r["curve"], target) for r in ok]
        reach_s = ", ".join("never" if s is None else str(s) for s in reach)
        switch = (
            ", ".join(str(r["switched_to_base_at_step"] or "none") for r in ok)
            if name == "mkor-h"
            else ""
        )
        lines.append(
            f"| {name} | {ok[0]['lr']:g} | {statistics.mean(accs):.3f} +- {sd:.3f} "
            f"({', '.join(f'{a:.3f}' for a in accs)}) | {reach_s} | "
            f"{statistics.mean(r['seconds_per_step'] for r in ok):.2f} | {switch} |"
        )
    return lines


def _plot_curves(runs: dict, path: str, steps: int) -> None:
    """Validation accuracy against step: the mean over seeds, the band from min to max."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            continue
        stepsx = [h["step"] for h in ok[0]["curve"]]
        acc = [[h["accuracy"] for h in r["curve"]] for r in ok]
        mean = [statistics.mean(c[i] for c in acc) for i in range(len(stepsx))]
        (line,) = ax.plot(stepsx, mean, marker="o", label=f"{name} (lr {ok[0]['lr']:g})")
        ax.fill_between(
            stepsx,
            [min(c[i] for c in acc) for i in range(len(stepsx))],
            [max(c[i] for c in acc) for i in range(len(stepsx))],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xlabel("optimizer step (batch 16)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"MiniLM on bbc-news, {len(next(iter(runs.values())))} seeds (band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def part_mfac_warmup(seeds=(0, 1, 2), steps=120, m=32) -> list[str]:
    """M-FAC's warm-up divisor: the reference's ``m`` from a zero window against the vectors seen
    so far, on a 20-64-64-4 MLP fitting a teacher (full batch, float64); the training loss at
    steps 5, 16, 32 and the end, mean over seeds, for several learning rates."""
    import torch

    from curvature.optim import MFAC

    lines = [
        f"| lr | warmup | loss @5 | @16 | @{m} | @{steps} |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for lr in (1e-4, 3e-4, 1e-3):
        for warmup in ("window", "seen"):
            curves = []
            for seed in seeds:
                gen = torch.Generator().manual_seed(seed)
                x = torch.randn(256, 20, generator=gen, dtype=torch.float64)
                y = (x @ torch.randn(20, 4, generator=gen, dtype=torch.float64)).argmax(1)
                torch.manual_seed(seed)
                model = torch.nn.Sequential(
                    torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                    torch.nn.Tanh(), torch.nn.Linear(64, 4),
                ).double()  # fmt: skip
                opt = MFAC(model.parameters(), lr=lr, gradients=m, damping=1e-4,
                           fisher_dtype=torch.float64, warmup=warmup)  # fmt: skip
                curve = []
                for _ in range(steps):
                    opt.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()
                    curve.append(loss.item())
                curves.append(curve)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(steps)]
            lines.append(
                f"| {lr:g} | {warmup} | {mean[4]:.4f} | {mean[15]:.4f} | {mean[m - 1]:.4f} | "
                f"{mean[-1]:.4f} |"
            )
    return lines


def part_mfac_product(ms=(64, 256), d=669_706) -> list[str]:
    """M-FAC's inverse-Fisher product against a float32 matrix-vector product over the same
    ``m x d`` window (``G @ x``), per storage dtype; ``d`` is the 784-512-512-10 MLP's size."""
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from _bench import copy_bandwidth

    from curvature import SlidingWindowFisherInverse

    bw = copy_bandwidth()

    def timed(fn, n=10):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n

    lines = [
        f"copy bandwidth {bw / 1e9:.1f} GB/s (float64 copy, read + write)",
        "",
        "| m | storage | G@x float32 ms | mul ms | x G@x | add_and_mul ms | x G@x | mul GB/s | of copy |"
        " refactors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in ms:
        g32 = torch.randn(m, d)
        x = torch.randn(d)
        base = timed(lambda g32=g32, x=x: g32 @ x)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            f = SlidingWindowFisherInverse(
                d, window=m, damping=1e-5, dtype=dtype, normalizer="window"
            )
            f.add_grad(g32)
            before = f.refactors
            t_mul = timed(lambda f=f, x=x: f.mul(x))
            pushes = 32  # fresh gradients (pushing one vector again makes the window singular)
            pool = iter(torch.randn(pushes + 1, d))
            t_am = timed(lambda f=f, pool=pool: f.add_and_mul(next(pool)), n=pushes)
            nbytes = 2 * m * d * f.grads.element_size()
            lines.append(
                f"| {m} | {str(dtype).split('.')[-1]} | {base * 1e3:.1f} | {t_mul * 1e3:.1f} | "
                f"{t_mul / base:.2f} | {t_am * 1e3:.1f} | {t_am / base:.2f} | "
                f"{nbytes / t_mul / 1e9:.1f} | {nbytes / t_mul / bw:.0%} | "
                f"{f.refactors - before} of {pushes + 12} |"
            )
            print(lines[-1], flush=True)
            del f
        del g32
    return lines


def part_tiny_bert() -> list[str]:
    """The test suite's tiny BERT (2 layers, hidden 16, 64 training sentences, batch 8, 64 steps):
    final validation accuracy of M-FAC over a grid of settings, beside SGD with momentum and the
    adaptive optimizers (the majority class gives 0.5625)."""
    import contextlib
    import io
    import tempfile
    import warnings
    from pathlib import Path

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny import make_csv, make_model_dir

    from curvature.cli.main import main as cli

    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="bench-tiny-bert-"))
    model_dir, data = make_model_dir(root / "model"), make_csv(root / "train.csv")
    runs = [("adamw", 1e-2, {}), ("adahessian", 0.2, {})]
    runs += [("sgd", lr, {}) for lr in (0.01, 0.1, 1.0)]
    runs += [
        ("mfac", lr, {"gradients": m, "damping": d})
        for lr in (0.01, 0.1, 1.0)
        for d in (1e-3, 1e-1)
        for m in (4, 16)
    ]
    lines = [
        "| optimizer | lr | settings | accuracy at steps 20, 40, 60, 64 | train loss |",
        "|---|---:|---|---|---:|",
    ]
    for i, (name, lr, kw) in enumerate(runs):
        out = root / f"run{i}"
        argv = ["train", "--optimizer", name, "--model", str(model_dir), "--data", str(data),
                "--output", str(out), "--epochs", "8", "--batch-size", "8", "--eval-every", "20",
                "--no-progress", "--lr", str(lr)]  # fmt: skip
        for k, v in kw.items():
            argv += ["--opt", f"{k}={v}"]
        with contextlib.redirect_stdout(io.StringIO()):
            cli(argv)
        m = json.loads((out / "metrics.json").read_text())
        accs = ", ".join(f"{h['accuracy']:.3f}" for h in m["curve"])
        settings = ", ".join(f"{k}={v:g}" for k, v in kw.items()) or "-"
        lines.append(f"| {name} | {lr:g} | {settings} | {accs} | {m['train_loss']:.3f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "cost":
            res = _cost_one(rest[0], rest[1], int(rest[2]))
        else:
            res = _quality_one(
                rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]), float(rest[5]),
                int(rest[6]), *rest[7:8],
            )  # fmt: skip
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--part",
        choices=["cost", "quality", "compare", "mfac-warmup", "mfac-product", "tiny-bert", "all"],
        default="all",
    )
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="quality: which to run")
    ap.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="NAME=LR",
        help="quality: learning rate for one optimizer (default: curvature train's)",
    )
    ap.add_argument("--threads", type=int, default=0, help="quality: torch threads per run")
    ap.add_argument("--plot", default=None, help="quality: write the learning curves here (PNG)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--max-eval", type=int, default=300)
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--setup", choices=sorted(SETUPS), default="minilm", help="compare: which")
    ap.add_argument(
        "--lr-from", default=None, help="compare: take the learning rates chosen in this JSON"
    )
    args = ap.parse_args()
    import platform

    print(
        f"# bench_optim on {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}"
    )
    out = {}
    if args.part == "compare":
        seeds = [int(s) for s in args.seeds.split(",")]
        names = [n for n in args.optimizers.split(",") if n] if args.optimizers != ",".join(
            OPTIMIZERS) else COMPARED  # fmt: skip
        path = args.json or f"bench-optim-compare-{args.setup}.json"
        res = part_compare(args.setup, names, seeds, args.threads, path, args.lr_from)
        print("\n".join(compare_tables(res, names, seeds)))
        if args.plot:
            plot_compare(res, names, seeds, args.plot)
        return
    if args.part == "tiny-bert":
        print("\n".join(part_tiny_bert()))
        return
    if args.part == "mfac-product":
        print("\n".join(part_mfac_product()))
        return
    if args.part == "mfac-warmup":
        print("\n".join(part_mfac_warmup()))
        return
    if args.part in ("cost", "all"):
        lines, rows = part_cost(args.quick)
        print("\n" + "\n".join(lines) + "\n", flush=True)
        out["cost"] = {"rows": rows, **_environment()}
    if args.part in ("quality", "all"):
        seeds = [int(s) for s in args.seeds.split(",")]
        lrs = {k: float(v) for k, v in (item.rsplit("=", 1) for item in args.lr)}
        names = [n for n in args.optimizers.split(",") if n]
        lines, runs = part_quality(
            names, seeds, args.steps, args.eval_every, args.target, args.max_eval, lrs,
            args.threads, args.plot,
        )  # fmt: skip
        print("\n" + "\n".join(lines) + "\n", flush=True)
        out["quality"] = {"table": lines, "runs": runs, "steps": args.steps, "target": args.target}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
