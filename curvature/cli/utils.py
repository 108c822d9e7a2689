"""Small helpers shared by the command-line jobs: progress switches, peak memory, sizes on disk."""

from __future__ import annotations

from pathlib import Path


def quiet_progress() -> None:
    """Hide the progress bars of the libraries underneath (datasets, transformers)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def reset_peak_memory() -> None:
    """Reset this process's peak resident memory (Linux; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def folder_bytes(path: str | Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))
