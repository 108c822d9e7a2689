"""Helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import math
import time

import torch


def environment() -> dict:
    """What a benchmark's raw file records about the machine and the run: CPUs, torch threads,
    torch version and date."""
    import os

    return {
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def copy_bandwidth(nbytes: int = 1 << 29) -> float:
    """Bytes per second of a large float64 tensor copy (read + write), best of five."""
    a = torch.ones(nbytes // 8, dtype=torch.float64)
    b = torch.empty_like(a)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


#: a ``curvature`` command in a child process that writes its exit code and peak memory (MiB)
CHILD = (
    "import json, resource, sys\n"
    "from curvature.cli.main import main\n"
    "rc = main(sys.argv[2:])\n"
    "json.dump({'rc': rc, 'max_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss "
    "/ 1024}, open(sys.argv[1], 'w'))\n"
    "sys.exit(rc)\n"
)


def run_child(argv: list[str]) -> tuple[int, dict]:
    """``curvature ARGV`` in its own process: ``(exit code, {wall_s, rc, max_rss_mib})``."""
    import json
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, fh.name, *argv], check=False)
        wall = time.perf_counter() - t0
        usage = json.loads(Path(fh.name).read_text() or "{}")
    return proc.returncode, {"wall_s": wall, **usage}
