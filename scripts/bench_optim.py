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
    # 64 tokens, judged by validation loss (mean next-token cross-entropy) on 4 held-out articles
    # (64-token windows, stride 32); a step costs 3.5 (AdamW) to 28 s (SOAP) on 2 cores, which
    # sets the budget
    "smollm2": {
        "job": {"model": "smollm2", "task": "causal-lm", "max_length": 64, "batch_size": 4},
        "metric": "loss",
        "steps": 10,
        "eval_every": 2,
        "max_eval": 4,
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
    """A setting from the command line: ``16``, ``1e-4``, ``0.5``, or a pair ``0.9/0.99``."""
    if "/" in text:
        return tuple(_number(t) for t in text.split("/"))
    try:
        return int(text)
    except ValueError:
        return float(text)


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
    out = {"setup": setup, "spec": spec, "runs": {}}
    if os.path.exists(json_path):
        out = json.load(open(json_path))  # resume
    run = _runner(out, json_path, threads)

    if chosen:  # no tuning here: every optimizer's first seed first, then the next seeds
        for s in seeds:
            for name in names:
                if chosen.get(name):
                    run(name, s, chosen[name])
        return out
    for name in names:
        _tune_lr(run, name, seeds[0], optimizer_row(name).lr, spec["metric"])
        best = _best_lr(out, name, seeds[0])
        if best is None:
            continue
        for s in seeds[1:]:
            run(name, s, best)
    return out


EXTEND = 2


def _runner(out: dict, json_path: str, threads: int):
    """``run(name, seed, lr, fresh=False)``: the fine-tuning run of ``out``'s setup, from
    ``out["runs"]`` when it is there (a resumed file), else (unless ``fresh``) from
    ``out["reused"]``, else in a fresh process, saved to ``json_path`` at once."""
    setup = out["setup"]
    spec = out["spec"]

    def run(name, seed, lr, fresh=False):
        key = f"{name}|{seed}|{lr:g}"
        if not fresh and key not in out["runs"] and key in out.get("reused", {}):
            return out["reused"][key]
        if key not in out["runs"]:
            out["runs"][key] = _sub(
                ["quality", name, str(seed), str(spec["steps"]), str(spec["eval_every"]),
                 str(spec["max_eval"]), str(lr), str(threads), setup]
            )  # fmt: skip
            out["runs"][key]["commit"] = _commit()
            with open(json_path, "w") as fh:
                json.dump(out, fh, indent=1)
            r = out["runs"][key]
            print(f"{setup} {key}: {r.get(spec['metric'], r.get('error'))}", flush=True)
        return out["runs"][key]

    return run


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


# --part target: time to a target set by tuned AdamW
TARGETED = ["adamw", "muon", "soap", "adahessian", "mfac", "mkor", "mkor-h"]
# each optimizer's one most important setting besides the learning rate, with the two values
# probed beside its default (at the best learning rate, on the first seed)
KNOBS = {
    "adamw": ("betas", ["0.9/0.99", "0.9/0.95"]),  # default 0.9/0.999
    "muon": ("momentum", ["0.9", "0.98"]),  # 0.95
    "soap": ("precondition_frequency", ["3", "30"]),  # 10
    "adahessian": ("update_each", ["2", "4"]),  # 1
    "mfac": ("gradients", ["8", "32"]),  # the window, 16
    "mkor": ("inv_freq", ["3", "30"]),  # 10
    "mkor-h": ("switch_window", ["5", "10"]),  # 20: four windows do not fit a short budget
}


def _seed_runs(out: dict, base: str, seed: int) -> dict:
    """``{(name, lr): run}`` of ``base``'s runs (any setting) on ``seed`` that did not fail,
    reused ones included."""
    found = {}
    for key, r in (out.get("reused", {}) | out["runs"]).items():
        name, s, lr = key.split("|")
        if name.split(":")[0] == base and s == str(seed) and "error" not in r:
            found[(name, float(lr))] = r
    return found


def _pick(runs: dict, metric: str):
    """The ``(name, lr)`` of the best run (the first listed among equals)."""
    if not runs:
        return None
    sign = 1 if metric == "loss" else -1
    return min(runs, key=lambda k: sign * runs[k][metric])


def part_target(
    setup: str,
    names: list[str],
    seeds: list[int],
    threads: int,
    json_path: str,
    reuse: str | None = None,
    settings_from: str | None = None,
) -> dict:
    """Tune every optimizer with the same budget on the first seed: the learning-rate rule of
    :func:`_tune_lr` (3 to 5 runs) at its default settings, then its :data:`KNOBS` setting at two
    other values at the best rate; the best of these runs is its choice, run on the other seeds.
    The target (:func:`target_rows`) is tuned AdamW's final metric.

    ``reuse``: a ``--part compare`` file of the same setup and protocol whose runs stand in for
    tuning runs (kept apart under ``"reused"``): the metric is deterministic given the seed, the
    time is not, so the chosen settings' runs on every seed, the first included, run here.
    ``settings_from``: no tuning; every optimizer's choice in that file, on every seed."""
    from curvature.optim.registry import get as optimizer_row

    spec = SETUPS[setup]
    metric = spec["metric"]
    out = {"setup": setup, "spec": spec, "runs": {}, "chosen": {}, "knobs": KNOBS}
    if os.path.exists(json_path):
        out = json.load(open(json_path))  # resume
    if reuse:
        prev = json.load(open(reuse))
        if prev["spec"] != spec:
            raise SystemExit(f"--reuse {reuse}: its protocol {prev['spec']} is not {spec}")
        out["reused"] = prev["runs"]
        out["reused_from"] = os.path.basename(reuse)
    run = _runner(out, json_path, threads)
    if settings_from:
        out["chosen"] = {
            n: c for n, c in json.load(open(settings_from))["chosen"].items() if n in names
        }
        out["settings_from"] = os.path.basename(settings_from)
    if settings_from:  # seed by seed, so that a run cut short has every optimizer's first seeds
        for s in seeds:
            for base in names:
                if base in out["chosen"]:
                    c = out["chosen"][base]
                    run(c["name"], s, c["lr"], fresh=True)
        names = []
    for base in names:
        if not settings_from:
            probes = _tune_lr(run, base, seeds[0], optimizer_row(base).lr, metric)
            ok = {lr: r for lr, r in probes.items() if "error" not in r}
            if not ok:  # its row in the table shows the error
                out["chosen"][base] = {"name": base, "lr": optimizer_row(base).lr}
                continue
            best_lr = _pick({(base, lr): r for lr, r in ok.items()}, metric)[1]
            key, values = KNOBS[base]
            for v in values:
                run(f"{base}:{key}={v}", seeds[0], best_lr)
            name, lr = _pick(_seed_runs(out, base, seeds[0]), metric)
            out["chosen"][base] = {"name": name, "lr": lr}
        if base not in out["chosen"]:
            continue
        c = out["chosen"][base]
        for s in seeds:
            run(c["name"], s, c["lr"], fresh=True)
    with open(json_path, "w") as fh:
        json.dump(out, fh, indent=1)
    return out


def _tune_lr(run, name: str, seed: int, default: float, metric: str) -> dict:
    """The learning-rate rule: three runs at ``default`` / 3, ``default``, ``default`` x 3; while
    the best is at an end of the grid, one more x 3 step beyond it, at most :data:`EXTEND` times.
    Returns ``{lr: run}``."""
    lower = metric == "loss"
    probes = {lr: run(name, seed, lr) for lr in (default / 3, default, default * 3)}
    for _ in range(EXTEND):
        ok = {lr: r for lr, r in probes.items() if "error" not in r}
        if not ok:
            break
        best = (min if lower else max)(ok, key=lambda lr: ok[lr][metric])
        if best == max(probes):
            nxt = best * 3
        elif best == min(probes):
            nxt = best / 3
        else:
            break
        probes[nxt] = run(name, seed, nxt)
    return probes


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


_T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}  # Student t, 95% two-sided, by n


def _spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """``mean [min, max]`` of the seeds' values."""
    if not values:
        return "-"
    m = statistics.mean(values)
    return f"{fmt.format(m)} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def _reach(curve: list[dict], target: float, metric: str):
    """The first evaluation at or beyond ``target`` (below it for a loss), or None."""
    sign = -1 if metric == "loss" else 1
    return next((h for h in curve if sign * (h[metric] - target) >= 0), None)


def target_rows(out: dict) -> tuple[float, list[dict]]:
    """The target and one row per optimizer of a ``--part target`` file: its chosen setting's
    runs on every seed, the evaluation at which each first reaches the target, the final metric.

    The target is the worst final metric among tuned AdamW's seeds: the level every AdamW seed
    reaches within the budget."""
    metric = out["spec"]["metric"]
    finals = {}
    for base, c in out["chosen"].items():
        rs = [
            r for k, r in out["runs"].items()
            if k.split("|")[0] == c["name"] and float(k.split("|")[2]) == c["lr"]
        ]  # fmt: skip
        finals[base] = (
            sorted([r for r in rs if "error" not in r], key=lambda r: r["seed"])
            or [r for r in rs][:1]
        )
    ok_adamw = [r for r in finals.get("adamw", []) if "error" not in r]
    if not ok_adamw:
        raise ValueError("no AdamW runs: the target is tuned AdamW's")
    worst = max if metric == "loss" else min
    target = worst(r[metric] for r in ok_adamw)
    rows = []
    for base, rs in finals.items():
        c = out["chosen"][base]
        ok = [r for r in rs if "error" not in r]
        hits = [_reach(r["curve"], target, metric) for r in ok]
        vals = [r[metric] for r in ok]
        half = (
            _T975.get(len(vals), 1.96) * statistics.stdev(vals) / math.sqrt(len(vals))
            if len(vals) > 1 else float("nan")
        )  # fmt: skip
        rows.append({
            "optimizer": base, "setting": c["name"], "lr": c["lr"], "seeds": len(ok),
            "error": None if ok else (rs[0].get("error", "failed") if rs else "not run"),
            "reached": sum(h is not None for h in hits),
            "steps": [h["step"] for h in hits if h], "seconds": [h["seconds"] for h in hits if h],
            "final": vals, "final_mean": statistics.mean(vals) if vals else None,
            "final_half": half,
            "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in ok) if ok else None,
            "peak_bytes": max((r["peak_bytes"] or 0) for r in ok) if ok else None,
            "switched": [r.get("switched_to_base_at_step") for r in ok],
        })  # fmt: skip
    base_row = next(r for r in rows if r["optimizer"] == "adamw")
    for r in rows:
        if r["error"] or r["optimizer"] == "adamw":
            r["against_adamw"] = "" if r["optimizer"] == "adamw" else "did not run"
        elif r["reached"] < r["seeds"]:
            missed = r["seeds"] - r["reached"]
            r["against_adamw"] = f"later (target missed on {missed} seed{'s' * (missed != 1)})"
        elif max(r["seconds"]) < min(base_row["seconds"]):
            r["against_adamw"] = "sooner, beyond the spread"
        elif min(r["seconds"]) > max(base_row["seconds"]):
            r["against_adamw"] = "later, beyond the spread"
        else:
            r["against_adamw"] = "within the spread"
    return target, rows


def target_tuning_table(out: dict) -> list[str]:
    """Every optimizer's tuning probes on the first seed and its choice (``--part target``)."""
    metric = out["spec"]["metric"]
    seed0 = min(int(k.split("|")[1]) for k in out["runs"])
    lines = [
        f"| optimizer | learning-rate probes (seed {seed0}: final {metric}) | setting probes at "
        "the best rate | chosen |",
        "|---|---|---|---|",
    ]
    for base in out["chosen"]:
        probes = _seed_runs(out, base, seed0)
        lr_s = ", ".join(
            f"{lr:g}: {r[metric]:.3f}" for (n, lr), r in sorted(probes.items()) if n == base
        )
        knob_s = ", ".join(
            f"{n.split(':', 1)[1]}: {r[metric]:.3f}"
            for (n, lr), r in sorted(probes.items()) if n != base
        )  # fmt: skip
        c = out["chosen"][base]
        lines.append(f"| {base} | {lr_s} | {knob_s} | {c['name']}, lr {c['lr']:g} |")
    return lines


def target_tables(out: dict) -> list[str]:
    """The time-to-target table of a ``--part target`` file (the target in its header)."""
    spec, metric = out["spec"], out["spec"]["metric"]
    target, rows = target_rows(out)
    fmt = "{:.3f}" if metric == "loss" else "{:.4f}"
    adamw_s = statistics.mean(next(r for r in rows if r["optimizer"] == "adamw")["seconds"])
    reach = f"{'<=' if metric == 'loss' else '>='} {target:.4f}"
    lines = [
        f"| optimizer | setting, lr | seeds reaching {metric} {reach} (AdamW's worst seed at "
        f"step {spec['steps']}) | steps to it, mean [min, max] | seconds to it, mean [min, max] "
        f"| AdamW seconds / these | final {metric}, mean [95% interval] | s/step | peak GiB | "
        "against AdamW (seconds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['optimizer']} | error: {r['error']} | | | | | | | | |")
            continue
        speed = (
            f"{adamw_s / statistics.mean(r['seconds']):.2f}"
            if r["reached"] == r["seeds"] and r["seconds"] else "-"
        )  # fmt: skip
        lo, hi = r["final_mean"] - r["final_half"], r["final_mean"] + r["final_half"]
        if metric == "accuracy":  # the t-interval of three seeds can pass the bounds
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        final = f"{fmt.format(r['final_mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"
        setting = r["setting"].split(":", 1)[1] + ", " if ":" in r["setting"] else ""
        lines.append(
            f"| {r['optimizer']} | {setting}{r['lr']:g} | {r['reached']} of {r['seeds']} | "
            f"{_spread(r['steps'])} | {_spread(r['seconds'])} | {speed} | {final} | "
            f"{r['seconds_per_step']:.2f} | {r['peak_bytes'] / 2**30:.2f} | {r['against_adamw']} |"
        )
    return lines


def _plot_metric_curves(setup: str, metric: str, series: list, path: str, target=None) -> None:
    """``series``: ``[(label, runs)]``; each label's metric against optimizer steps and against
    training seconds (mean over its runs; band: min-max), with ``target`` as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax_step, ax_time = fig.subplots(1, 2)
    seeds = 0
    for label, rs in series:
        if not rs:
            continue
        seeds = max(seeds, len(rs))
        n = min(len(r["curve"]) for r in rs)
        xs = [rs[0]["curve"][i]["step"] for i in range(n)]
        ts = [statistics.mean(r["curve"][i]["seconds"] for r in rs) for i in range(n)]
        ys = [[r["curve"][i][metric] for r in rs] for i in range(n)]
        for ax, x in ((ax_step, xs), (ax_time, ts)):
            (line,) = ax.plot(x, [statistics.mean(v) for v in ys], marker="o", label=label)
            ax.fill_between(x, [min(v) for v in ys], [max(v) for v in ys], alpha=0.12,
                            color=line.get_color())  # fmt: skip
    what = {"minilm": "MiniLM on bbc-news", "smollm2": "SmolLM2-135M on BBC text"}
    for ax, xl in ((ax_step, "optimizer step"), (ax_time, "training seconds (2-core CPU)")):
        if target is not None:
            ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label="target")
        ax.set_xlabel(xl)
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        ax.set_title(f"{what[setup]}: {seeds} seeds (band: min-max)", fontsize=9)
    ax_step.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_target(out: dict, path: str) -> None:
    """Each optimizer's chosen setting on every seed, with the target."""
    target, _ = target_rows(out)
    series = [
        (base, [
            r for k, r in out["runs"].items()
            if k.split("|")[0] == c["name"] and float(k.split("|")[2]) == c["lr"]
            and "error" not in r
        ])
        for base, c in out["chosen"].items()
    ]  # fmt: skip
    _plot_metric_curves(out["setup"], out["spec"]["metric"], series, path, target)


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
    """Each optimizer's best learning rate (on the first seed) on every seed."""
    metric = SETUPS[out["setup"]]["metric"]
    series = []
    for name in names:
        best = _best_lr(out, name, seeds[0])
        if best is None:
            continue
        finals = [
            r for k, r in out["runs"].items()
            if k.split("|")[0] == name and float(k.split("|")[2]) == best and "error" not in r
        ]  # fmt: skip
        series.append((f"{name} (lr {best:g})", finals))
    _plot_metric_curves(out["setup"], metric, series, path)


def _sub(args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def part_mfac_warmup(seeds=(0, 1, 2), steps=120, m=32) -> dict:
    """M-FAC's warm-up divisor: the reference's ``m`` from a zero window against the vectors seen
    so far, on a 20-64-64-4 MLP fitting a teacher (full batch, float64); the training loss at
    every step, mean over seeds, for several learning rates (:func:`mfac_warmup_table`)."""
    import torch

    from curvature.optim import MFAC

    rows = []
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
            rows.append({"lr": lr, "warmup": warmup, "seeds": list(seeds), "mean_loss": mean})
    return {"gradients": m, "steps": steps, "rows": rows}


def mfac_warmup_table(raw: dict) -> list[str]:
    m, steps = raw["gradients"], raw["steps"]
    lines = [
        f"| lr | warmup | loss @5 | @16 | @{m} | @{steps} |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in raw["rows"]:
        c = r["mean_loss"]
        lines.append(
            f"| {r['lr']:g} | {r['warmup']} | {c[4]:.4f} | {c[15]:.4f} | {c[m - 1]:.4f} | "
            f"{c[-1]:.4f} |"
        )
    return lines


def part_mfac_product(ms=(64, 256), d=669_706) -> dict:
    """M-FAC's inverse-Fisher product against a float32 matrix-vector product over the same
    ``m x d`` window (``G @ x``), per storage dtype; ``d`` is the 784-512-512-10 MLP's size."""
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from _bench import copy_bandwidth, environment

    from curvature import SlidingWindowFisherInverse

    bw = copy_bandwidth()

    def timed(fn, n=10):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n

    rows = []
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
            rows.append({
                "m": m, "storage": str(dtype).split(".")[-1], "matvec_s": base, "mul_s": t_mul,
                "add_and_mul_s": t_am, "bytes": 2 * m * d * f.grads.element_size(),
                "refactors": f.refactors - before, "pushes": pushes + 12,
            })  # fmt: skip
            print(rows[-1], flush=True)
            del f
        del g32
    return {"d": d, "copy_bytes_per_s": bw, "rows": rows, **environment()}


def mfac_product_table(raw: dict) -> list[str]:
    bw = raw["copy_bytes_per_s"]
    lines = [
        "| m | storage | G@x float32 ms | mul ms | x G@x | add_and_mul ms | x G@x | mul GB/s | "
        f"of copy ({bw / 1e9:.1f} GB/s, float64 copy, read + write) | refactors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in raw["rows"]:
        base, t_mul, t_am = r["matvec_s"], r["mul_s"], r["add_and_mul_s"]
        lines.append(
            f"| {r['m']} | {r['storage']} | {base * 1e3:.1f} | {t_mul * 1e3:.1f} | "
            f"{t_mul / base:.2f} | {t_am * 1e3:.1f} | {t_am / base:.2f} | "
            f"{r['bytes'] / t_mul / 1e9:.1f} | {r['bytes'] / t_mul / bw:.0%} | "
            f"{r['refactors']} of {r['pushes']} |"
        )
    return lines


def part_tiny_bert() -> dict:
    """The test suite's tiny BERT (2 layers, hidden 16, 64 training sentences, batch 8, 64 steps):
    final validation accuracy of M-FAC over a grid of settings, beside SGD with momentum and the
    adaptive optimizers (the majority class gives 0.5625)."""
    import contextlib
    import io
    import tempfile
    import warnings
    from pathlib import Path

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from models import make_csv, make_model_dir

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
    rows = []
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
        rows.append({
            "optimizer": name, "lr": lr, "settings": kw, "train_loss": m["train_loss"],
            "curve": [{"step": h["step"], "accuracy": h["accuracy"]} for h in m["curve"]],
        })  # fmt: skip
        print(tiny_bert_table({"rows": rows})[-1], flush=True)
    return {"rows": rows}


def tiny_bert_table(raw: dict) -> list[str]:
    lines = [
        "| optimizer | lr | settings | accuracy at steps 20, 40, 60, 64 | train loss |",
        "|---|---:|---|---|---:|",
    ]
    for r in raw["rows"]:
        accs = ", ".join(f"{h['accuracy']:.3f}" for h in r["curve"])
        settings = ", ".join(f"{k}={v:g}" for k, v in r["settings"].items()) or "-"
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {settings} | {accs} | {r['train_loss']:.3f} |"
        )
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
        choices=[
            "cost",
            "quality",
            "compare",
            "target",
            "mfac-warmup",
            "mfac-product",
            "tiny-bert",
            "all",
        ],  # fmt: skip
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
    ap.add_argument(
        "--reuse", default=None, help="target: tuning runs from this --part compare JSON"
    )
    ap.add_argument(
        "--settings-from", default=None, help="target: no tuning, the choices in this JSON"
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
    if args.part == "target":
        seeds = [int(s) for s in args.seeds.split(",")]
        names = [n for n in args.optimizers.split(",") if n] if args.optimizers != ",".join(
            OPTIMIZERS) else TARGETED  # fmt: skip
        if names[0] != "adamw":
            ap.error("--optimizers: the target is AdamW's, so it comes first")
        path = args.json or f"bench-optim-target-{args.setup}.json"
        res = part_target(
            args.setup, names, seeds, args.threads, path, args.reuse, args.settings_from
        )
        print("\n".join(target_tables(res)))
        if args.plot:
            plot_target(res, args.plot)
        return
    small = {
        "tiny-bert": (part_tiny_bert, tiny_bert_table),
        "mfac-product": (part_mfac_product, mfac_product_table),
        "mfac-warmup": (part_mfac_warmup, mfac_warmup_table),
    }
    if args.part in small:
        measure, table = small[args.part]
        raw = measure()
        print("\n".join(table(raw)))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(raw, fh, indent=1)
        return
    if args.part in ("cost", "all"):
        sys.path.insert(0, os.path.dirname(__file__))
        from _bench import environment

        lines, rows = part_cost(args.quick)
        print("\n" + "\n".join(lines) + "\n", flush=True)
        out["cost"] = {"rows": rows, **environment()}
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
