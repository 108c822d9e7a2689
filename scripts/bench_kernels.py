"""Benchmark the kernels: time, bandwidth against the device's copy bandwidth, speedup over torch.

For realistic sizes (a BERT-base encoder's 85M prunable weights, Fisher blocks B = 32 and 50,
k = 1 to 64 gradients per batch; float64 blocks, the default storage, and on CUDA also float32)
each operation, the greedy OBS sequence of the default pruning mode included, is timed through its torch reference and, on a
CUDA device with Triton installed, through its Triton kernel, in the same run. Bandwidth counts
the bytes the operation must move at least once (blocks read and written, gradients read), so
``% of copy`` says how close each implementation is to the memory-bound limit.

    python scripts/bench_kernels.py                 # on a CUDA device: torch vs Triton
    python scripts/bench_kernels.py --quick         # smaller sizes (CPU: torch reference only)

Without a CUDA device only the torch reference is timed (Triton's CPU interpreter is a
correctness tool, not a performance one), and the Triton columns say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial

import torch
from _bench import environment


def _timeit(fn, reps: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, numel: int) -> float:
    a = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    t = _timeit(lambda: b.copy_(a), 5)
    return 2 * a.numel() * 4 / t


def rows(device, quick: bool, triton_ok: bool, reps: int, dtypes=(torch.float64,)):
    from curvature.kernels import adahessian, mkor, obs, woodbury

    weights = 85_000_000 // (100 if quick else 1)
    if device.type == "cpu" and not quick:
        weights //= 10  # float64 blocks of all 85M weights do not fit a small machine's memory
    out = []
    for dtype in dtypes:
        tag = {torch.float64: "f64", torch.float32: "f32"}[dtype]
        for bsz in (32, 50):
            n = weights // bsz
            blocks = torch.eye(bsz, dtype=dtype, device=device).repeat(n, 1, 1)
            for k in (1, 8, 64):
                grads = torch.randn(k, n, bsz, dtype=dtype, device=device)
                nbytes = (
                    2 * blocks.numel() * blocks.element_size()
                    + grads.numel() * grads.element_size()
                )
                t_ref = _timeit(partial(woodbury.reference, blocks, grads, 64), reps)
                t_tri = (
                    _timeit(partial(woodbury.launch, blocks, grads, 64), reps)
                    if triton_ok
                    else None
                )
                out.append((f"woodbury {tag} B={bsz} k={k}", n * bsz, nbytes, t_ref, t_tri))
                del grads
            w = torch.randn(n, bsz, dtype=dtype, device=device)
            pruned = torch.rand(n, bsz, device=device) < 0.5
            nbytes = blocks.numel() * blocks.element_size() + 2 * w.numel() * w.element_size()
            t_ref = _timeit(partial(obs.reference_update, w, blocks, pruned, 1), reps)
            t_tri = (
                _timeit(partial(obs.launch_update, w, blocks, pruned, 1), reps)
                if triton_ok
                else None
            )
            out.append((f"obs update {tag} B={bsz}", n * bsz, nbytes, t_ref, t_tri))

            def ref_nm(w=w, blocks=blocks):
                obs.reference_nm_select(obs.reference_scores(w, blocks, 1), 2, 4)

            nbytes = n * bsz * blocks.element_size() + 2 * w.numel() * w.element_size()
            t_ref = _timeit(ref_nm, reps)
            t_tri = (
                _timeit(partial(obs.launch_scores, w, blocks, 1, (2, 4)), reps)
                if triton_ok
                else None
            )
            out.append((f"obs scores+2:4 {tag} B={bsz}", n * bsz, nbytes, t_ref, t_tri))
            # greedy OBS (the default pruning mode): half of every block, one weight at a time;
            # at least the blocks read once and the order and costs written
            valid = torch.ones(n, bsz, dtype=torch.bool, device=device)
            steps = bsz // 2
            nbytes = blocks.numel() * blocks.element_size() + w.numel() * w.element_size()
            nbytes += n * steps * 16
            t_ref = _timeit(partial(obs.reference_greedy, w, blocks, valid, 1, steps=steps), 1)
            t_tri = (
                _timeit(partial(obs.launch_greedy, w, blocks, valid, 1, steps=steps), reps)
                if triton_ok
                else None
            )
            out.append((f"greedy OBS {tag} B={bsz}, {steps} steps", n * bsz, nbytes, t_ref, t_tri))
            del blocks, w
    # AdaHessian over a BERT-base-sized parameter set (float32 state)
    p = torch.randn(weights, device=device)
    g, d, m, v = (torch.randn_like(p) for _ in range(4))
    v.abs_()
    hyper = dict(
        step=3,
        hessian_step=3,
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-4,
        weight_decay=0.01,
        hessian_power=1.0,
        block_length=1,
    )
    nbytes = 8 * p.numel() * 4  # read p, g, d, m, v; write p, m, v
    step = hyper.pop("step"), hyper.pop("hessian_step")
    args = ([p], [g], [d], [m], [v], [step[0]], [step[1]])
    t_ref = _timeit(partial(adahessian.reference_group, *args, **hyper), reps)
    t_tri = _timeit(partial(adahessian.launch_group, *args, **hyper), reps) if triton_ok else None
    out.append(("adahessian update", p.numel(), nbytes, t_ref, t_tri))
    del p, g, d, m, v
    # MKOR: the 72 factors of a BERT-base (768 and 3072 wide), float64
    sizes = [769, 768] * 36 + [3073, 768] * 6 + [769, 3072] * 6
    if quick:
        sizes = sizes[:12]
    invs = [torch.eye(s, dtype=torch.float64, device=device) for s in sizes]
    vecs = [torch.randn(s, dtype=torch.float64, device=device) for s in sizes]
    nbytes = sum(2 * s * s * 8 for s in sizes)
    t_ref = _timeit(partial(mkor.reference, invs, vecs, 0.95), reps)
    t_tri = _timeit(partial(mkor.launch, invs, vecs, 0.95), reps) if triton_ok else None
    out.append((f"mkor rank-1, {len(sizes)} factors", sum(sizes), nbytes, t_ref, t_tri))
    return out


def table(raw: dict) -> list[str]:
    """The Markdown table of a raw run (``--json``): times and the share of the copy bandwidth
    measured in the same run."""
    copy = raw["copy_bandwidth"]
    lines = [
        f"| operation | elements | torch ms | torch % of copy ({copy / 1e9:.1f} GB/s) | triton ms | "
        "triton % of copy | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in raw["rows"]:
        t_ref, t_tri, nbytes = row["torch_s"], row["triton_s"], row["bytes"]
        if t_tri is None:
            tri = "not measured | not measured | n/a"
        else:
            tri = f"{t_tri * 1e3:.2f} | {nbytes / t_tri / copy * 100:.0f}% | {t_ref / t_tri:.1f}x"
        lines.append(
            f"| {row['operation']} | {row['elements']:,} | {t_ref * 1e3:.1f} | "
            f"{nbytes / t_ref / copy * 100:.0f}% | {tri} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float64", "float32"],
        help="block storage (default: float64, the toolkit's default, and on CUDA also float32)",
    )
    ap.add_argument("--json", default=None, help="also write the raw times to this file")
    args = ap.parse_args()
    from curvature.kernels import TRITON_AVAILABLE

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    triton_ok = device.type == "cuda" and TRITON_AVAILABLE
    copy = copy_bandwidth(device, 1 << 26)
    print(
        f"# bench_kernels on {device.type} ({name}; {os.cpu_count()} CPUs), "
        f"{time.strftime('%Y-%m-%d')}; copy bandwidth {copy / 1e9:.1f} GB/s"
    )
    if not triton_ok:
        print("# no CUDA device with Triton here: the Triton columns are not measured")
    names = args.dtypes or (["float64", "float32"] if device.type == "cuda" else ["float64"])
    dtypes = tuple(getattr(torch, d) for d in names)
    raw = {
        "device": device.type,
        "name": name,
        **environment(),
        "quick": args.quick,
        "copy_bandwidth": copy,
        "rows": [],
    }
    for label, numel, nbytes, t_ref, t_tri in rows(
        device, args.quick, triton_ok, args.reps, dtypes
    ):
        raw["rows"].append(
            {
                "operation": label,
                "elements": numel,
                "bytes": nbytes,
                "torch_s": t_ref,
                "triton_s": t_tri,
            }
        )
    print("\n".join(table(raw)), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)


if __name__ == "__main__":
    main()
