"""Compile every kernel for real GPU targets, without a GPU, and check registers and spills.

Every launch configuration the dispatcher can choose (:func:`curvature.kernels.specs.all_specs`)
is compiled with Triton's compiler for each target (``triton.compile`` with an explicit
``GPUTarget``), and the ``cuobjdump`` bundled with Triton reads the cubin's resource usage:
registers per thread, stack frame and shared memory; the assembler's own report (``ptxas -v``,
which Triton runs, its log read here) gives the spill stores and loads. A stack frame without
spills is the call frame of the IEEE division subroutine, not register pressure. The table adds
an estimated occupancy (resident warps per SM over the maximum, from the register file, shared
memory and thread limits of the architecture).

    python scripts/check_kernels.py                    # sm_80 and sm_90, table on stdout
    python scripts/check_kernels.py --arch 90 --jobs 2 --markdown docs/check-kernels.md

Exit status 1 if any configuration fails to compile or spills (spill stores or loads > 0).
Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler); it unsets it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are decorated
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # the assembler's log exists only for a fresh compile
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

# Per-SM limits: registers, shared memory (bytes usable by blocks), threads, blocks.
ARCH = {
    80: dict(regs=65536, smem=164 * 1024, threads=2048, blocks=32, name="sm_80 (A100)"),
    90: dict(regs=65536, smem=228 * 1024, threads=2048, blocks=32, name="sm_90 (H100/H200)"),
}
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def occupancy(arch: int, regs: int, shared: int, warps: int) -> float:
    lim = ARCH[arch]
    threads = 32 * warps
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocation granularity: 256 per warp
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_smem = lim["smem"] // max(shared, 1)
    by_threads = lim["threads"] // threads
    blocks = min(by_regs, by_smem, by_threads, lim["blocks"])
    return blocks * threads / lim["threads"]


def compile_one(index: int, arch: int) -> dict:
    """Compile spec ``index`` of :func:`all_specs` for ``sm_<arch>``."""
    from curvature.kernels.specs import all_specs

    return compile_spec(all_specs()[index], arch)


def compile_spec(spec, arch: int) -> dict:
    """Compile one launch configuration for ``sm_<arch>``; its resources (or the error line)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=spec.kernel, config=spec.label, sizes=spec.sizes, arch=arch)
    consts = dict(spec.constexprs)
    sig = dict(spec.signature)
    sig.update({k: "constexpr" for k in consts})
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=spec.fn, signature=sig, constexprs=consts)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas -v log
            k = triton.compile(
                src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps}
            )
        sm = _SPILL.search(log.getvalue())
        if sm is None:
            raise RuntimeError("no ptxas report (is TRITON_DUMP_PTXAS_LOG honoured?)")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run(
                [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True
            ).stdout
        m = _USAGE.search(out)
        if m is None:
            raise RuntimeError(f"no resource line in cuobjdump output: {out.strip()[:200]}")
        regs, stack, static_shared, local = map(int, m.groups())
        shared = max(static_shared, int(k.metadata.shared))
        row.update(
            regs=regs,
            stack=stack,
            spill=int(sm.group(2)) + int(sm.group(3)) + local,
            shared=shared,
            occupancy=occupancy(arch, regs, shared, spec.num_warps),
            error=None,
        )
    except Exception as exc:  # a compile error is a finding, reported in the table
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        row.update(regs=None, spill=None, stack=None, shared=None, occupancy=None, error=first)
    row["seconds"] = time.perf_counter() - t0
    return row


def check(archs, jobs: int, only: str | None = None) -> list[dict]:
    from curvature.kernels.specs import all_specs

    specs = all_specs()
    chosen = [i for i, s in enumerate(specs) if not only or only in f"{s.kernel} {s.label}"]
    if not chosen:
        raise SystemExit(f"check_kernels: --only {only!r} matches no kernel configuration")
    work = [(i, a) for a in archs for i in chosen]
    if jobs <= 1:
        return [compile_one(i, a) for i, a in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, *zip(*work)))


def table(rows: list[dict]) -> str:
    head = (
        "| target | kernel | config | sizes dispatched | regs | spill B | stack B | shared B "
        "| occupancy |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["error"]:
            lines.append(
                f"| sm_{r['arch']} | {r['kernel']} | {r['config']} | {r['sizes']} "
                f"| COMPILE ERROR: {r['error']} | | | | |"
            )
            continue
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']} | {r['config']} | {r['sizes']} | {r['regs']} "
            f"| {r['spill']} | {r['stack']} | {r['shared']} | {r['occupancy']:.0%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCH))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", help="only configurations whose kernel or config contains this text")
    ap.add_argument("--markdown", help="also write the table (and a summary) to this file")
    ap.add_argument(
        "--json",
        help="also write every row and the summary to this file (the raw file from which "
        "scripts/tables.py makes docs/check-kernels.md's table)",
    )
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print(
            "check_kernels: Triton is not installed (pip install -e '.[triton]')", file=sys.stderr
        )
        return 2
    t0 = time.perf_counter()
    rows = check(args.arch, args.jobs, args.only)
    bad = [r for r in rows if r["error"] or r["spill"]]
    import triton

    summary = (
        f"{len(rows)} configurations ({len(rows) // len(args.arch)} per target) compiled with "
        f"Triton {triton.__version__} for {', '.join(ARCH[a]['name'] for a in args.arch)} in "
        f"{time.perf_counter() - t0:.0f} s: "
        + ("no compile error, no spill." if not bad else f"{len(bad)} FAILED (error or spill).")
    )
    text = table(rows)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"summary": summary, "triton": triton.__version__, "rows": rows}, f, indent=1)
    print(text)
    print()
    print(summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(
                "# Kernel compile and resource check\n\n"
                "`python scripts/check_kernels.py --markdown docs/check-kernels.md` "
                "(no GPU needed; CI runs it through `tests/kernel/test_check_kernels.py`).\n\n"
                f"{summary}\n\n{text}\n"
            )
    for r in bad:
        what = f"compile error: {r['error']}" if r["error"] else f"{r['spill']} bytes of spill"
        print(
            f"check_kernels: {r['kernel']} [{r['config']}] on sm_{r['arch']}: {what}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
