"""Benchmark the Fisher-inverse estimators: time per add_grad batch and per mul, peak memory,
and achieved memory bandwidth against this machine's measured copy bandwidth.

These operations are memory-bound: a Woodbury batch reads and writes every block once, a product
reads every block once; M-FAC reads its m x d rows. "GB/s" below counts those bytes; "of copy" is
that rate divided by the bandwidth of a large tensor copy measured in the same run.

    python scripts/bench_curvature.py            # the table of docs/bench-curvature.md (a few minutes on 2 cores)
    python scripts/bench_curvature.py --quick    # small sizes only
    python scripts/bench_curvature.py --storage  # M-FAC product: float32 against float64 storage
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _bench import copy_bandwidth

from curvature import FisherInverse, SlidingWindowFisherInverse
from curvature.cli.utils import peak_memory_bytes, reset_peak_memory


def timed(fn, repeat=3):
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_fisher(d, m, block, k, algorithm, bw):
    reset_peak_memory()
    base = peak_memory_bytes() or 0
    f = FisherInverse(d, gradients=m, damping=1e-7, block_size=block, algorithm=algorithm)
    g = torch.randn(k, d)
    # fill to m - k gradients first so the timed batch sees a full-size state
    filled = 0
    while filled < m - k:
        step = min(k, m - k - filled)
        f.add_grad(g[:step])
        filled += step
    t0 = time.perf_counter()
    f.add_grad(g)
    t_add = time.perf_counter() - t0
    x = torch.randn(d)
    t_mul = timed(lambda: f.mul(x))
    stored = FisherInverse.estimate_bytes(d, gradients=m, block_size=block, algorithm=algorithm)
    if algorithm == "woodbury":
        add_bytes, mul_bytes = 2 * stored, stored
    else:
        add_bytes, mul_bytes = (
            stored * k / m,
            2 * stored,
        )  # new rows read all old rows; mul: W twice
    peak = (peak_memory_bytes() or 0) - base
    return t_add, t_mul, add_bytes / t_add, mul_bytes / t_mul, stored, peak


def bench_storage(d=500_000, m=128, repeat=15):
    """``FisherInverse.mul`` in the M-FAC form with float32 and float64 storage of ``W``
    (``m x d``), against the two-pass floor: ``c = W x`` and ``W^T c`` as two float32
    matrix-vector products over the same ``W`` (what any product must at least read)."""
    g = torch.randn(m, d)
    x = torch.randn(d)
    rows = {}
    for dtype in (torch.float32, torch.float64):
        f = FisherInverse(d, gradients=m, damping=1e-7, algorithm="mfac", dtype=dtype)
        f.add_grad(g)
        f.mul(x)  # warm
        rows[str(dtype).replace("torch.", "")] = timed(lambda f=f: f.mul(x), repeat)
        del f
    w = g.contiguous()
    floor = timed(lambda: w.T @ (w @ x), repeat)
    print(f"M-FAC product, d {d:,}, m {m}, one vector, {torch.get_num_threads()} threads:")
    print(f"{'storage':>10} {'mul ms':>8} {'x floor':>8}")
    print(f"{'floor':>10} {floor * 1e3:>8.1f} {1.0:>8.2f}   (two float32 passes over W)")
    for name, t in rows.items():
        print(f"{name:>10} {t * 1e3:>8.1f} {t / floor:>8.2f}")
    return rows, floor


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-gib", type=float, default=6.0, help="skip configurations storing more")
    ap.add_argument("--storage", action="store_true", help="only the M-FAC storage comparison")
    args = ap.parse_args()
    if args.storage:
        torch.manual_seed(0)
        bench_storage()
        return
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"threads: {torch.get_num_threads()}, measured copy bandwidth: {bw / 1e9:.1f} GB/s\n")
    ds = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    ms = [32, 256] if args.quick else [32, 256, 1024]
    blocks = [32, 128, 512, 2048, None]
    hdr = f"{'d':>10} {'m':>5} {'B':>6} {'alg':>8} {'k':>3} {'add ms':>9} {'mul ms':>8} {'add GB/s':>9} {'of copy':>8} {'mul GB/s':>9} {'of copy':>8} {'stored GiB':>10} {'peak GiB':>9}"
    print(hdr)
    print("-" * len(hdr))
    for d in ds:
        for m in ms:
            for block in blocks:
                alg = "mfac" if block is None else "woodbury"
                k = min(16, m)
                stored = FisherInverse.estimate_bytes(
                    d, gradients=m, block_size=block, algorithm=alg
                )
                if stored > args.max_gib * 2**30 or (block is not None and block > d):
                    continue
                if alg == "mfac" and d * m > 2e9:
                    continue
                t_add, t_mul, bw_add, bw_mul, stored, peak = bench_fisher(d, m, block, k, alg, bw)
                print(
                    f"{d:>10,} {m:>5} {block or 'whole':>6} {alg:>8} {k:>3} {t_add * 1e3:>9.1f} {t_mul * 1e3:>8.1f} "
                    f"{bw_add / 1e9:>9.2f} {bw_add / bw:>8.1%} {bw_mul / 1e9:>9.2f} {bw_mul / bw:>8.1%} "
                    f"{stored / 2**30:>10.2f} {peak / 2**30:>9.2f}",
                    flush=True,
                )
    print("\nSliding window (M-FAC optimizer structure): one add_grad and one mul at full window")
    print(f"{'d':>10} {'m':>5} {'add ms':>9} {'mul ms':>8} {'mul GB/s':>9} {'of copy':>8}")
    for d in ds[:2]:
        for m in ms:
            s = SlidingWindowFisherInverse(d, window=m, damping=1e-6)
            g = torch.randn(m, d)
            s.add_grad(g)
            t_add = timed(lambda s=s, g=g: s.add_grad(g[0]))
            x = torch.randn(d)
            t_mul = timed(lambda s=s, x=x: s.mul(x))
            mul_bytes = 2 * m * d * 4
            print(
                f"{d:>10,} {m:>5} {t_add * 1e3:>9.1f} {t_mul * 1e3:>8.1f} {mul_bytes / t_mul / 1e9:>9.2f} {mul_bytes / t_mul / bw:>8.1%}"
            )


if __name__ == "__main__":
    main()
