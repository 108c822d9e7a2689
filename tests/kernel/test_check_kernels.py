"""The compile and resource check: every kernel configuration the dispatcher can choose compiles
for sm_80 and sm_90 without spilling (no GPU needed), and the check does catch a spill.

The compiles run in a subprocess: this process has ``TRITON_INTERPRET=1``, which replaces the
compiler with the interpreter.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from curvature import kernels
from curvature.kernels import adahessian, obs, specs, woodbury

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_kernels.py"
pytestmark = pytest.mark.skipif(not kernels.TRITON_AVAILABLE, reason="Triton is not installed")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _key(cfg: dict):
    """A launch configuration, with NM_PRUNE left out: the check compiles one N per N:M run
    length M (N only changes a compare constant, not the code's shape or registers)."""
    return tuple(sorted((k, v) for k, v in cfg.items() if k != "NM_PRUNE"))


def _compiled(kernel):
    return {
        _key(dict(s.constexprs) | {"num_warps": s.num_warps})
        for s in specs.all_specs()
        if s.kernel == kernel
    }


def test_every_dispatched_size_has_a_compiled_configuration():
    """What ``supported`` lets through is exactly what the check compiles (no size unchecked)."""
    wood = _compiled("woodbury._woodbury_kernel")
    scores, upd = _compiled("obs._scores_kernel"), _compiled("obs._update_kernel")
    greedy = _compiled("obs._greedy_kernel")
    for bsz in range(1, 300):
        blocks = torch.empty(1, bsz, bsz)
        if woodbury.supported(blocks, blocks):
            assert _key(woodbury.config(bsz)) in wood, bsz
        w = torch.empty(1, bsz)
        for g in (1, 2, 3, 4, 8):
            for nm in (None, (2, 4), (4, 8), (1, 4), (8, 16), (16, 32)):
                if nm is not None and g != 1:
                    continue
                if obs.supported(w, g, nm):
                    assert _key(obs.scores_config(bsz, g, nm)) in scores, (bsz, g, nm)
                    if nm is None:
                        assert _key(obs.update_config(bsz, g)) in upd, (bsz, g)
                if obs.greedy_supported(w, g, nm):
                    assert _key(obs.greedy_config(bsz, g, nm)) in greedy, (bsz, g, nm)
    assert woodbury.supported(torch.empty(1, 64, 64), torch.empty(1))
    assert not woodbury.supported(torch.empty(1, 65, 65), torch.empty(1))
    assert not obs.supported(torch.empty(1, 300), 1)
    assert not obs.greedy_supported(torch.empty(1, 65), 1)
    assert not obs.supported(torch.empty(1, 64), 8)  # a group the check does not compile
    seg = 1
    while seg <= adahessian.MAX_SEGMENT:
        assert _key(adahessian.config(seg) | {"HAS_D": True}) in _compiled(
            "adahessian._adahessian_kernel"
        )
        seg *= 2


def test_check_catches_a_spill():
    """A block of 128 in registers (the Woodbury kernel before its size limit) spills on sm_90."""
    code = (
        "import sys; sys.path.insert(0, 'scripts');"
        "import check_kernels as ck;"
        "from curvature.kernels import specs, woodbury;"
        "s = [s for s in specs.all_specs() if s.kernel == 'woodbury._woodbury_kernel'][0];"
        "import dataclasses;"
        "big = dataclasses.replace(s, constexprs=(('BP', 128),), num_warps=8);"
        "r = ck.compile_spec(big, 90); print('SPILL', r['spill'], r['regs'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("SPILL")]
    assert line, out.stderr[-2000:]
    spill = int(line[0].split()[1])
    assert spill > 0


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "80", "90"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(out.stdout)  # the table, shown with -s or on failure
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no compile error, no spill" in out.stdout
    for name in ("woodbury.", "obs._scores", "obs._update", "obs._greedy", "adahessian.", "mkor."):
        for arch in ("sm_80", "sm_90"):
            assert f"| {arch} | {name}" in out.stdout, (arch, name)
