"""What the jobs write and how they fail: output folders written atomically, checkpoints beside
them, and the errors a user can act on.

An output is written to a temporary folder beside the target and renamed into place only when the
job succeeds, so a failed run never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path


class JobError(ValueError):
    """A user-facing job failure with a message that says what to change."""


class SweepError(JobError):
    """A sweep or report that cannot run as asked."""


def checkpoint_dir(output: str | Path) -> Path:
    """Where a prune job keeps its resumable checkpoints (beside the output, removed on success)."""
    out = Path(output)
    return out.parent / f".{out.name}.checkpoints"


def latest_checkpoint(output: str | Path) -> Path:
    folder = checkpoint_dir(output)
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not found:
        raise JobError(
            f"--resume: no checkpoint in {folder}; an interrupted run leaves one there when it "
            "was started with --checkpoint-every N"
        )
    return found[-1]


def check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise JobError(
            f"output {path} already exists and is not empty; choose another folder or pass --overwrite"
        )


# partial output folders being written by this process (removed on SIGTERM by the CLI)
_PARTIAL: set[Path] = set()


def remove_partial_outputs() -> list[Path]:
    """Remove every partial output folder this process is writing; return them."""
    removed = sorted(_PARTIAL)
    for tmp in removed:
        shutil.rmtree(tmp, ignore_errors=True)
    _PARTIAL.clear()
    return removed


def _rank() -> int:
    from curvature.core.parallel import world

    return world()[0]


@contextlib.contextmanager
def atomic_output(out: Path, *, private: bool = False):
    """Yield a temporary folder beside ``out``; it replaces ``out`` only if the block succeeds.

    On any exception (an error or Ctrl-C) the temporary folder is removed; on SIGTERM the CLI's
    handler removes it (:func:`remove_partial_outputs`) before exiting. A process killed outright cannot clean up: the next run names what it
    left (``.NAME.partial-*``) in a warning. The result gets the permissions of the user's umask
    (a temporary folder is created owner-only).

    Under torch.distributed only rank 0 writes: the others work in a scratch folder, unless
    ``private`` (a rank that runs in a folder of its own and reads its outputs back: the sweep).
    """
    if _rank() != 0 and not private:
        tmp = Path(tempfile.mkdtemp(prefix="curvature-rank-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(out.parent.glob(f".{out.name}.partial-*"))
    if leftovers:
        warnings.warn(
            f"{len(leftovers)} partial output folder(s) of an interrupted run remain: "
            f"{', '.join(str(p) for p in leftovers)}; remove them if no other run is writing "
            f"{out}",
            stacklevel=3,
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    _PARTIAL.add(tmp)
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _PARTIAL.discard(tmp)


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes the user's umask gives new files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):
                os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
