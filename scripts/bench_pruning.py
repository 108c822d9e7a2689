"""Benchmark one OBS pruning step, stage by stage, and the allocation at BERT-base size.

Parts (each prints its Markdown tables and with ``--json`` writes the raw numbers they are made
from, which ``scripts/tables.py`` turns into docs/bench-pruning.md's tables; run them alone for
clean numbers):

- ``stages``: one one-shot OBS step on the embedded MiniLM (its 36 encoder linear weight matrices,
  10.6M weights, real gradients from bbc-news): time and peak memory of gradient collection + Fisher
  build, scoring, allocation and update, with the memory plan beside the measured peak.
- ``bert-base``: the same stages on one BERT-base encoder layer (7.1M weights: q, k, v, o,
  intermediate, output) with synthetic gradients, and the whole encoder (85M weights, 12 layers)
  extrapolated from it: the Fisher alone is 17 GB in float32 at block 50, beyond this machine.
- ``allocation``: choosing the k cheapest of 85M costs: the threshold selection against the
  stable sort of every cost it replaced (same run), and the copy bandwidth as the physical
  limit (the selection must read every cost at least once).
- ``dtype``: float32 against float64 Fisher storage on MiniLM: the masks' agreement and the
  one-shot accuracy at 50/70/80% (same gradients), the measurement behind the default.
- ``layerwise``: the layer-wise methods on the three layer shapes of SmolLM2 (576x576, 1536x576,
  576x1536; 16,384 calibration tokens with outlier features): the layer Hessian in float64
  against float32 products summed in float64, SparseGPT's column sweep (this toolkit's, float64,
  lazy updates in blocks of 128) against plain loops of the same algorithm (every column's
  update applied at once to all later columns, float32 and float64; the published lazy loop in
  float32), Wanda, and OBC on a slice of rows extrapolated to the layer. The limit printed is the
  float64 matrix-product rate of this machine (the lazy update is a matrix product).

    python scripts/bench_pruning.py --part stages --json docs/bench-pruning/stages.json
    python scripts/bench_pruning.py --part bert-base --json docs/bench-pruning/bert-base.json
    python scripts/bench_pruning.py --part allocation --json docs/bench-pruning/allocation.json
    python scripts/bench_pruning.py --part dtype --json docs/bench-pruning/dtype.json
    python scripts/bench_pruning.py --part layerwise --json docs/bench-pruning/layerwise.json
    python scripts/bench_pruning.py --part reconstruct --json docs/bench-pruning/reconstruct.json
    python scripts/bench_pruning.py --part reference --checkouts SPARSEGPT,WANDA,GPTQ \
        --raw docs/bench-reference-smollm2.jsonl

- ``reference``: SparseGPT, Wanda and GPTQ through this toolkit's API against the authors'
  scripts (checkouts of their three repositories, in that order) on SmolLM2-135M at one thread:
  64 calibration sequences of 256 tokens from BBC News, each point in its own process, time split
  into forward passes, ``X^T X`` accumulation and solves, and perplexity on the first 40
  validation articles (``scripts/_reference.py`` says what the harness changes to run the
  scripts). Raw JSON lines go to ``--raw`` (finished points are skipped on a rerun);
  ``scripts/tables.py`` makes the table (kind ``layerwise-reference``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from _bench import copy_bandwidth, environment

from curvature.cli.utils import peak_memory_bytes, reset_peak_memory
from curvature.pruning import obs, parts, stages
from curvature.pruning.allocation import GlobalThreshold, take_cheapest, take_cheapest_by_sorting
from curvature.pruning.curvatures import EmpiricalFisher
from curvature.pruning.params import select_params
from curvature.pruning.settings import PruneSettings
from curvature.pruning.solvers import GreedyOBS, IndependentOBS
from curvature.pruning.targets import Target


class Stopwatch:
    def __init__(self):
        self.rows = []

    def run(self, name, fn):
        reset_peak_memory()
        t = time.perf_counter()
        out = fn()
        self.rows.append((name, time.perf_counter() - t, peak_memory_bytes()))
        return out


def one_step(model, data, loss_fn, targets, how, grads=None):
    """The stages of one pruning step on one memory group, timed; ``how``: the call's settings,
    the Fisher (its gradients, damping and dtype) and the solver."""
    import psutil

    settings, curvature, solver = how
    base_rss = psutil.Process().memory_info().rss
    sw = Stopwatch()
    structure = settings.structure
    weights = {t.name: t.blocks_of(t.param.detach().flatten().to(obs.F64)) for t in targets}
    fixed = {t.name: torch.zeros(t.num_blocks, t.block, dtype=torch.bool) for t in targets}
    if grads is None:
        grads = stages.collect_gradients(
            model, data, loss_fn, targets, gradients=curvature.gradients, progress=True
        )
    curv = sw.run("gradients + Fisher", lambda: curvature.build(targets, grads, settings))
    scored = sw.run(
        "scoring", lambda: stages.score(targets, weights, fixed, curv, solver, structure)
    )
    costs = {t.name: scored[t.name][1] for t in targets}
    counts = sw.run(
        "allocation",
        lambda: GlobalThreshold().counts(targets, costs, settings.sparsity, structure.group),
    )

    def update():
        for t in targets:
            o, c = scored[t.name]
            stages.update(t, weights[t.name], curv[t.name], solver, o, c, counts[t.name], structure)

    sw.run("update", update)
    plan = stages.memory_plan(model, targets, [targets], curvature, structure)
    plan.base_rss = base_rss
    return sw.rows, plan


def stage_run(title, rows, plan) -> dict:
    """One timed step as raw numbers (seconds, bytes) for the stage tables."""
    return {
        "title": title,
        "rows": [{"stage": n, "seconds": secs, "peak_bytes": peak} for n, secs, peak in rows],
        "base_rss": plan.base_rss,
        "curvature": plan.curvature,
        "total": plan.total,
    }


def stage_table(raw: dict, which: str = "0") -> list[str]:
    """The stage table of run ``which`` of a raw ``stages``/``bert-base`` file; ``"1x12"``: run 1
    extrapolated to 12 layers (seconds and plan times 12; peaks are of one layer, not shown)."""
    index, _, times = which.partition("x")
    run, scale = raw["runs"][int(index)], int(times or 1)
    gib = 2**30
    lines = ["| stage | seconds | peak RSS (GiB) |", "|---|---:|---:|"]
    for r in run["rows"]:
        shown = f"{r['peak_bytes'] / gib:.2f}" if scale == 1 else "-"
        lines.append(f"| {r['stage']} | {r['seconds'] * scale:.1f} | {shown} |")
    lines += [
        f"| total | {sum(r['seconds'] for r in run['rows']) * scale:.1f} | |",
        f"| resident before the step (model, data, libraries) | | {run['base_rss'] / gib:.2f} |",
        f"| memory plan (x{scale}): curvature | | {run['curvature'] * scale / gib:.2f} |",
        f"| memory plan (x{scale}): peak | | {run['total'] * scale / gib:.2f} |",
    ]
    return lines


def minilm(gradients=64, max_train=512):
    from curvature.integrations.hf import model_loss
    from curvature.tasks.data import load_task, tokenize
    from curvature.tasks.models import load_classifier

    task = load_task("bbc-news", max_train=max_train, max_validation=300)
    model, tok = load_classifier("default", task.num_labels, task.label_names)
    enc = tokenize(task, tok, max_length=128)
    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tok)
    loader = torch.utils.data.DataLoader(
        enc["train"], batch_size=8, shuffle=True, collate_fn=collator,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return model, loader, model_loss, enc, collator


def part_stages(args):
    model, loader, loss, _, _ = minilm(args.gradients)
    named = select_params(model, ["re:.*encoder.*(query|key|value|dense)\\.weight"])
    runs = []
    for dtype in (torch.float32, torch.float64):
        targets = [Target(n, p, args.block) for n, p in named]
        settings = PruneSettings(0.7)
        fisher = EmpiricalFisher(gradients=args.gradients, dtype=dtype)
        rows, plan = one_step(model, loader, loss, targets, (settings, fisher, GreedyOBS()))
        total = sum(t.numel for t in targets)
        runs.append(stage_run(
            f"MiniLM, {len(targets)} weight matrices, {total / 1e6:.1f}M weights, gradients "
            f"{args.gradients}, block {args.block}, greedy, Fisher {dtype}",
            rows, plan,
        ))  # fmt: skip
    return {"runs": runs}


def part_bert_base(args):
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    names = ["query", "key", "value", "attention.output", "intermediate", "output"]
    targets = [Target(n, p, args.block) for n, p in zip(names, params)]
    gen = torch.Generator().manual_seed(0)

    def grads():
        for _ in range(math.ceil(args.gradients / 16)):
            yield {t.name: torch.randn(16, t.numel, generator=gen) * 1e-3 for t in targets}

    settings = PruneSettings(0.7)
    fisher = EmpiricalFisher(gradients=args.gradients, dtype=torch.float32)
    model = torch.nn.Module()
    for n, p in zip(names, params):
        model.register_parameter(n.replace(".", "_"), p)
    runs = []
    for solver in (IndependentOBS(), GreedyOBS()):
        rows, plan = one_step(model, None, None, targets, (settings, fisher, solver), grads=grads())
        runs.append(stage_run(
            f"BERT-base, one encoder layer (7.1M weights), synthetic gradients, gradients "
            f"{args.gradients}, block {args.block}, {solver.name}, Fisher float32",
            rows, plan,
        ))  # fmt: skip
    return {"runs": runs}


def part_allocation(args) -> dict:
    bw = copy_bandwidth()
    gen = torch.Generator().manual_seed(0)
    sizes = [768 * 768] * 4 + [3072 * 768] * 2
    costs = [
        torch.sort(torch.rand(n // 50, 50, generator=gen, dtype=torch.float64), 1).values
        for n in sizes * 12
    ]
    total = sum(c.numel() for c in costs)
    k = int(0.7 * total)
    rows, counts = [], []
    for name, fn in (
        ("stable sort of every cost (before)", take_cheapest_by_sorting),
        ("threshold (now)", take_cheapest),
    ):
        t = time.perf_counter()
        counts.append(fn(costs, k))
        rows.append({"method": name, "seconds": time.perf_counter() - t})
    same = all(torch.equal(a, b) for a, b in zip(*counts))
    return {"copy_bandwidth": bw, "costs": total, "targets": len(costs), "rows": rows,
            "same_counts": same}  # fmt: skip


def allocation_table(raw: dict) -> list[str]:
    """Seconds against the sort of the same run, and bytes per second against the copy bandwidth
    (choosing must read every 8-byte cost once)."""
    bw = raw["copy_bandwidth"]
    base = raw["rows"][0]["seconds"]
    lines = [
        f"| method ({raw['costs'] / 1e6:.0f}M costs, {raw['targets']} targets) | seconds | "
        f"ratio to the sort | GB/s | of copy bandwidth ({bw / 1e9:.1f} GB/s) | same counts |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in raw["rows"]:
        rate = raw["costs"] * 8 / r["seconds"]
        lines.append(
            f"| {r['method']} | {r['seconds']:.2f} | {r['seconds'] / base:.3f} | "
            f"{rate / 1e9:.1f} | {rate / bw:.1%} | {raw['same_counts']} |"
        )
    return lines


def part_dtype(args) -> dict:
    from curvature.pruning import prune
    from curvature.tasks.kinds import classification_eval

    model, loader, loss, enc, collator = minilm(args.gradients)
    eval_loader = torch.utils.data.DataLoader(enc["validation"], batch_size=64, collate_fn=collator)
    # fine-tune the classifier first (2 epochs of the 512 training articles): pruning a model
    # that has not learnt the task says nothing about accuracy
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(2):
        for batch in loader:
            opt.zero_grad()
            loss(model, batch).backward()
            opt.step()
    model.eval()
    raw = {"dense_accuracy": classification_eval(model, eval_loader)["accuracy"], "rows": []}
    params = ["re:.*encoder.*(query|key|value|dense)\\.weight"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for s in (0.5, 0.7, 0.8):
        out = {}
        for dtype in (torch.float64, torch.float32):
            model.load_state_dict(state)
            r = prune(model, loader, loss_fn=loss, sparsity=s, params=params, progress=True, method=parts.OBS(gradients=args.gradients, block_size=args.block, dtype=dtype))  # fmt: skip
            acc = classification_eval(model, eval_loader)["accuracy"]
            out[dtype] = (
                r.masks.state_dict(),
                {k: v.clone() for k, v in model.state_dict().items()},
                acc,
            )
        m64, w64, a64 = out[torch.float64]
        m32, w32, a32 = out[torch.float32]
        same = sum(int((m64[n] & m32[n]).sum()) for n in m64) / sum(int(m64[n].sum()) for n in m64)
        rel = max(float((w64[n] - w32[n]).norm() / w64[n].norm()) for n in m64)
        raw["rows"].append({"sparsity": s, "masks_equal": same, "accuracy_float64": a64,
                            "accuracy_float32": a32, "max_rel_weight_diff": rel})  # fmt: skip
        print(f"sparsity {s:.2f} measured", flush=True)
        save(args, raw)  # a row at a time: the part is long
    model.load_state_dict(state)
    return raw


def dtype_table(raw: dict) -> list[str]:
    lines = [
        "| sparsity | masks equal (of pruned) | accuracy float64 | accuracy float32 | "
        "max rel. weight diff | dense accuracy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in raw["rows"]:
        lines.append(
            f"| {r['sparsity']:.2f} | {r['masks_equal']:.4f} | {r['accuracy_float64']:.4f} | "
            f"{r['accuracy_float32']:.4f} | {r['max_rel_weight_diff']:.2e} | "
            f"{raw['dense_accuracy']:.4f} |"
        )
    return lines


def _gemm_rate(dtype, n=1024) -> float:
    a = torch.randn(n, n, dtype=dtype)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _plain_sparsegpt(w, u, sparsity, lazy=False, block=128):
    """SparseGPT's column sweep written plainly (unstructured): the mask of each block of 128
    columns chosen when the sweep reaches it; with ``lazy=False`` every column's error goes at
    once to all later columns, with ``lazy=True`` inside the block, then one product to the
    columns after it (the published loop). ``w`` and ``u`` in the working dtype."""
    w = w.clone()
    rows, cols = w.shape
    edges = [round(sparsity * rows * c) for c in [*range(0, cols, block), cols]]
    for bi, i1 in enumerate(range(0, cols, block)):
        i2 = min(i1 + block, cols)
        d = torch.diagonal(u)[i1:i2]
        score = (w[:, i1:i2] ** 2 / (d * d)[None, :]).flatten()
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask[torch.topk(score, edges[bi + 1] - edges[bi], largest=False).indices] = True
        mask = mask.view(rows, -1)
        w1 = w[:, i1:i2].clone() if lazy else None
        err = torch.zeros(rows, i2 - i1, dtype=w.dtype)
        for i in range(i2 - i1):
            col = (w1 if lazy else w)[:, i if lazy else i1 + i]
            e = torch.where(mask[:, i], col, torch.zeros_like(col)) / d[i]
            if lazy:
                w1[:, i:] -= e[:, None] * u[i1 + i, i1 + i : i2][None, :]
                err[:, i] = e
            else:
                w[:, i1 + i :] -= e[:, None] * u[i1 + i, i1 + i :][None, :]
        if lazy:
            w[:, i1:i2] = w1
            w[:, i2:] -= err @ u[i1:i2, i2:]
    return w


def part_layerwise(args) -> dict:
    from curvature.pruning import layer_obs

    f64 = torch.float64
    raw = {"gemm64": _gemm_rate(f64), "gemm32": _gemm_rate(torch.float32), "tokens": 16384,
           "hessian": [], "layers": []}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    tokens = raw["tokens"]
    shapes = [("q/k/v/o 576x576", 576, 576), ("gate/up 1536x576", 1536, 576),
              ("down 576x1536", 576, 1536)]  # fmt: skip
    for cols in (576, 1536):
        x = torch.randn(tokens, cols, generator=gen)
        x[:, :4] *= 50.0  # outlier features
        t = time.perf_counter()
        x64 = x.to(f64)
        h64 = x64.T @ x64
        s64 = time.perf_counter() - t
        t = time.perf_counter()
        h32 = torch.zeros(cols, cols, dtype=f64)
        for b in range(0, tokens, 4096):
            xb = x[b : b + 4096]
            h32 += (xb.T @ xb).to(f64)
        s32 = time.perf_counter() - t
        err = float(((h32 - h64).abs() / h64.diagonal().sqrt().outer(h64.diagonal().sqrt())).max())
        raw["hessian"].append({"inputs": cols, "float64_s": s64, "float32_s": s32, "error": err})
    for name, rows, cols in shapes:
        x = torch.randn(tokens // 4, cols, generator=gen, dtype=f64)
        x[:, :4] *= 50.0
        h = 2 * x.T @ x / x.shape[0]
        w = torch.randn(rows, cols, generator=gen, dtype=f64) * 0.02
        row = {"layer": name, "flops": 2 * rows * cols * cols / 2}  # about half of rows x cols^2
        t = time.perf_counter()
        new, _, _ = layer_obs.sparsegpt(w, h, 0.5)
        row["toolkit_s"] = time.perf_counter() - t
        u, _ = layer_obs.damped_inverse(h, upper=True)
        t = time.perf_counter()
        plain = _plain_sparsegpt(w, u, 0.5)
        row["plain64_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _plain_sparsegpt(w.float(), u.float(), 0.5)
        row["plain32_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _plain_sparsegpt(w.float(), u.float(), 0.5, lazy=True)
        row["published32_s"] = time.perf_counter() - t
        t = time.perf_counter()
        layer_obs.wanda(w, h.diagonal(), 0.5)
        row["wanda_s"] = time.perf_counter() - t
        sub = 8
        t = time.perf_counter()
        layer_obs.obc(w[:sub], h, 0.5)
        row["obc_s"] = (time.perf_counter() - t) * rows / sub  # a slice of rows, extrapolated
        row["max_rel_diff_to_plain"] = float((new - plain).abs().max() / plain.abs().max())
        assert row["max_rel_diff_to_plain"] < 1e-8, row  # the plain loop is the same algorithm
        raw["layers"].append(row)
    return raw


def hessian_table(raw: dict) -> list[str]:
    lines = [
        f"| inputs | float64 X^T X ({raw['tokens']:,} tokens) | float32 products, float64 sum "
        "(batches of 4096) | ratio | max rel. error of H | matrix products of the run, GFLOP/s "
        "(float64, float32) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in raw["hessian"]:
        lines.append(
            f"| {r['inputs']} | {r['float64_s']:.2f} | {r['float32_s']:.2f} | "
            f"{r['float32_s'] / r['float64_s']:.2f} | {r['error']:.1e} | "
            f"{raw['gemm64'] / 1e9:.1f}, {raw['gemm32'] / 1e9:.1f} |"
        )
    return lines


def layerwise_table(raw: dict) -> list[str]:
    """Seconds per layer; the lazy update's rate against the float64 product rate of the run."""
    peak = raw["gemm64"]
    lines = [
        "| layer | this toolkit (float64, lazy blocks of 128) | plain loop float64 | "
        "plain loop float32 | published lazy loop float32 | Wanda | OBC (extrapolated) | "
        "ratio to plain float64 | GFLOP/s of the lazy update, of the float64 product rate "
        f"({peak / 1e9:.1f} GFLOP/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in raw["layers"]:
        ours = r["toolkit_s"]
        lines.append(
            f"| {r['layer']} | {ours:.2f} | {r['plain64_s']:.2f} | {r['plain32_s']:.2f} | "
            f"{r['published32_s']:.2f} | {r['wanda_s']:.3f} | {r['obc_s']:.0f} | "
            f"{ours / r['plain64_s']:.2f} | {r['flops'] / ours / 1e9:.1f}, "
            f"{r['flops'] / ours / peak:.0%} |"
        )
    return lines


def part_reconstruct(args) -> dict:
    """Fixed-mask reconstruction after SparseGPT on SmolLM2-shaped layers with outlier inputs:
    conjugate-gradient iterations and seconds per tolerance against SparseGPT's own solve (the
    same-run baseline), the error above the optimum of the mask, and the iterations' rate
    against this machine's float64 matrix-product rate (the limit: one [rows, cols] x
    [cols, cols] product per iteration)."""
    from curvature.pruning import layer_obs
    from curvature.pruning.reconstruct import reconstruct

    f64 = torch.float64
    raw = {"gemm64": _gemm_rate(f64), "threads": torch.get_num_threads(), "rows": []}
    gen = torch.Generator().manual_seed(0)
    shapes = [("q/o 576x576", 576, 576), ("gate/up 1536x576", 1536, 576),
              ("down 576x1536", 576, 1536)]  # fmt: skip
    for name, rows, cols in shapes:
        x = torch.randn(4096, cols, generator=gen, dtype=f64)
        x[:, :5] *= 30.0
        mix = torch.eye(cols, dtype=f64) + 0.3 * torch.randn(cols, cols, generator=gen, dtype=f64)
        x = x @ (mix / cols**0.5 + torch.eye(cols, dtype=f64))
        h = 2 * x.T @ x / x.shape[0]
        w = torch.randn(rows, cols, generator=gen, dtype=f64) * 0.02
        for label, kw in (("70%", {"sparsity": 0.7}), ("2:4", {"sparsity": 0.5, "nm": (2, 4)})):
            t = time.perf_counter()
            new, mask, _ = layer_obs.sparsegpt(w, h, **kw)
            s_gpt = time.perf_counter() - t
            best = reconstruct(w, h, mask, start=new, tol=1e-10, max_iter=1000).error_after
            s_direct = None
            if rows * cols <= 576 * 576:  # the direct solve of larger layers takes minutes
                t = time.perf_counter()
                reconstruct(w, h, mask, method="exact")
                s_direct = time.perf_counter() - t
            for tol in (1e-2, 1e-3, 1e-5, 1e-8):
                t = time.perf_counter()
                rec = reconstruct(w, h, mask, start=new, tol=tol, max_iter=1000)
                raw["rows"].append({
                    "layer": name, "mask": label, "sparsegpt_s": s_gpt, "tol": tol,
                    "sparsegpt_gap": (rec.error_before - best) / best,
                    "iterations": rec.iterations, "seconds": time.perf_counter() - t,
                    "gap_after": (rec.error_after - best) / best,
                    "flops": 2 * rows * cols * cols * max(rec.iterations, 1), "direct_s": s_direct,
                })  # fmt: skip
    return raw


def reconstruct_table(raw: dict) -> list[str]:
    peak = raw["gemm64"]
    lines = [
        "| layer | mask | SparseGPT s | SparseGPT error above optimum | tol | iterations | "
        "seconds | ratio to SparseGPT s | error above optimum | GFLOP/s, of the float64 product "
        f"rate ({peak / 1e9:.1f} GFLOP/s) | direct solve s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    last = None
    for r in raw["rows"]:
        rate = r["flops"] / r["seconds"]
        tail = (
            f"{r['tol']:g} | {r['iterations']} | {r['seconds']:.2f} | "
            f"{r['seconds'] / r['sparsegpt_s']:.2f} | {r['gap_after']:.1e} | "
            f"{rate / 1e9:.1f}, {rate / peak:.0%} |"
        )
        if (r["layer"], r["mask"]) == last:
            lines.append(f"| | | | | {tail} |")
            continue
        last = (r["layer"], r["mask"])
        direct = "not run" if r["direct_s"] is None else f"{r['direct_s']:.2f}"
        lines.append(
            f"| {r['layer']} | {r['mask']} | {r['sparsegpt_s']:.2f} | {r['sparsegpt_gap']:.1%} | "
            f"{tail} {direct} |"
        )
    return lines


def part_reference(args):
    """Each point of ``_reference.POINTS`` in a fresh process (``--child``), one after another."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import _reference as ref

    if not args.checkouts or not args.raw:
        raise SystemExit("--part reference needs --checkouts SPARSEGPT,WANDA,GPTQ and --raw FILE")
    dirs = args.checkouts.split(",")
    if len(dirs) != 3 or not all(Path(d, "README.md").is_file() for d in dirs):
        raise SystemExit(f"--checkouts: three checkouts (SparseGPT, Wanda, GPTQ), got {dirs}")
    checkouts = dict(zip(("sparsegpt", "wanda", "gptq"), (str(Path(d).resolve()) for d in dirs)))
    raw = Path(args.raw)
    done = set()
    if raw.exists():
        done = {ref.key(r["label"], r["implementation"]) for r in map(json.loads, raw.open())}
    only = {o.strip() for o in args.only.split(";") if o.strip()}
    opts = {"threads": args.threads, "eval_threads": args.eval_threads, "checkouts": checkouts}
    here = Path(__file__).resolve().parent
    for label, impl, method, settings in ref.POINTS:
        k = ref.key(label, impl)
        if k in done or (only and k not in only):
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            spec = {"point": [label, impl, method, settings], "opts": opts, "out": fh.name}
            code = "import sys, _reference; sys.exit(_reference.child_main(sys.argv[1:]))"
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=here,
                                  check=False, env={**os.environ, "PYTHONPATH": str(here)})  # fmt: skip
            if proc.returncode != 0:
                print(f"{k}: failed (exit {proc.returncode})")
                continue
            rec = json.loads(Path(fh.name).read_text())
        with raw.open("a") as out:
            out.write(json.dumps(rec) + "\n")
        print(f"{k}: {rec['seconds']:.1f} s, perplexity {rec['perplexity']:.2f}, "
              f"sparsity {rec['sparsity']:.3f}, timers {rec['timers']}", flush=True)  # fmt: skip


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--part",
        choices=["stages", "bert-base", "allocation", "dtype", "layerwise", "reconstruct",
                 "reference"],
        required=True,
    )  # fmt: skip
    ap.add_argument("--gradients", type=int, default=64)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--checkouts", help="reference: the SparseGPT, Wanda and GPTQ checkouts")
    ap.add_argument("--raw", help="reference: JSON lines file (appended; done points skipped)")
    ap.add_argument("--threads", type=int, default=1, help="reference: threads while pruning")
    ap.add_argument("--eval-threads", type=int, default=2, help="reference: threads to evaluate")
    ap.add_argument(
        "--only", default="", help="reference: 'label | implementation' to run, ;-separated"
    )
    ap.add_argument("--json", help="every part but reference: also write its raw numbers here")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part == "reference":
        part_reference(args)
        return
    measure, tables = PARTS[args.part]
    raw = measure(args)
    raw.update(environment())
    save(args, raw)
    for table in tables:
        print("\n" + "\n".join(table(raw)), flush=True)


def save(args, raw: dict) -> None:
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)


def _stage_tables(raw: dict) -> list[str]:
    out = []
    for i, run in enumerate(raw["runs"]):
        out += [f"### {run['title']}", "", *stage_table(raw, str(i)), ""]
        if run["title"].startswith("BERT-base"):
            out += ["### x12 (the whole encoder, extrapolated)", "",
                    *stage_table(raw, f"{i}x12"), ""]  # fmt: skip
    return out


PARTS = {
    "stages": (part_stages, [_stage_tables]),
    "bert-base": (part_bert_base, [_stage_tables]),
    "allocation": (part_allocation, [allocation_table]),
    "dtype": (part_dtype, [dtype_table]),
    "layerwise": (part_layerwise, [hessian_table, layerwise_table]),
    "reconstruct": (part_reconstruct, [reconstruct_table]),
}


if __name__ == "__main__":
    main()
