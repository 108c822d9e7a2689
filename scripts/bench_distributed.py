"""Pruning across processes: gradient collection time and Fisher memory per rank, 1/2/4 ranks.

A small BERT (built from a config: 4 layers, hidden 128, intermediate 512; 0.79M prunable
encoder weights) is pruned to 50% with gradient-Fisher OBS (64 gradients, blocks of 50, float64)
by 1, 2 and 4 ``gloo`` processes on 127.0.0.1, each with its shard of 64 batches of 8 x 64
tokens. Every rank runs ``torch.get_num_threads() // world`` threads (at least 1), so the runs
share the machine's cores alike. The same-run baseline is one process.

    python scripts/bench_distributed.py                 # worlds 1, 2, 4
    python scripts/bench_distributed.py --worlds 1 2    # fewer

Per world: seconds of each phase (the slowest rank's), the Fisher bytes each rank holds (from the
engine's memory plan) and how much each rank's peak resident memory (``ru_maxrss``) grew during
the prune call (the interpreter, torch and the model are there before it). On a machine with
fewer cores than ranks the processes share cores: collection time cannot fall there, and the
table says what memory sharding gives.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _bench import environment

from curvature.pruning import parts

NUM_GRADS, BATCHES, BATCH, SEQ = 64, 64, 8, 64


def _model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=SEQ,
        num_labels=4,
    )
    return BertForSequenceClassification(cfg).eval()


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(0, 1000, (BATCH, SEQ), generator=gen),
            "labels": torch.randint(0, 4, (BATCH,), generator=gen),
        }
        for _ in range(BATCHES)
    ]


def _loss(model, batch):
    return model(**batch).loss


def _worker(rank, world, port, threads, out):
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=600),
        )
    import psutil

    from curvature.pruning import prune

    model = _model()
    data = _batches()[rank::world]
    rss_before = psutil.Process().memory_info().rss
    t = time.perf_counter()
    report = prune(
        model,
        data,
        loss_fn=_loss,
        sparsity=0.5,
        params=["re:.*encoder.*(query|key|value|dense)\\.weight"],
        progress=False,
        method=parts.OBS(gradients=NUM_GRADS, block_size=50),
    )
    row = {
        "rank": rank,
        "seconds": time.perf_counter() - t,
        "phases": report.phases,
        "fisher_bytes": report.memory_plan.get("curvature", 0),
        # growth of the peak resident memory during the prune call
        "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
        "sparsity": report.global_sparsity,
    }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(row, f)
    if world > 1:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, threads_total: int) -> list[dict]:
    threads = max(1, threads_total // world)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(  # one process too: every run starts from a fresh interpreter
            _worker, args=(world, _port(), threads, out), nprocs=world, start_method="spawn"
        )
        rows = []
        for r in range(world):
            with open(f"{out}/rank{r}.json") as f:
                rows.append(json.load(f))
    return rows


def table(raw: dict) -> list[str]:
    """One row per world size from the ranks' raw rows (the slowest rank's phases, the largest
    Fisher share), the Fisher share against the first world's."""
    lines = [
        "| ranks | gradients per rank | gradients + Fisher s | scores s | allocation + update s "
        "| total s | Fisher MB per rank | peak RSS growth MB per rank | Fisher vs 1 rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = None
    grads = raw["gradients"]
    for run_ in raw["runs"]:
        world, rows = run_["world"], run_["ranks"]

        def ph(k, rows=rows):
            return max(r["phases"].get(k, 0.0) for r in rows)

        fisher = max(r["fisher_bytes"] for r in rows)
        rss = max(r["rss_bytes"] for r in rows)
        base = base or fisher
        per = f"{grads // world}" + ("" if grads % world == 0 else "+")
        lines.append(
            f"| {world} | {per} | {ph('gradients and curvature'):.1f} | {ph('scores'):.1f} "
            f"| {ph('allocation and update'):.1f} | {max(r['seconds'] for r in rows):.1f} "
            f"| {fisher / 2**20:.0f} | {rss / 2**20:.0f} | {fisher / base:.2f}x |"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", default=None, help="also write every rank's raw row to this file")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    threads_total = torch.get_num_threads()
    print(
        f"# bench_distributed on {platform.processor() or 'CPU'} ({cores} cores, "
        f"{threads_total} torch threads shared by the ranks), torch {torch.__version__}, gloo, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(
        f"# small BERT (4 x 128, FFN 512), OBS greedy 50%, {NUM_GRADS} gradients, blocks of 50, "
        "float64 Fisher"
    )
    raw = {
        "cores": cores,
        **environment(),
        "gradients": NUM_GRADS,
        "runs": [],
    }
    for world in args.worlds:
        raw["runs"].append({"world": world, "ranks": run(world, threads_total)})
        print(table(raw)[-1] if len(raw["runs"]) > 1 else "\n".join(table(raw)), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
