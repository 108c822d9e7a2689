"""Every Python example in the README runs, in order, in a fresh interpreter (one namespace, as
a reader pasting them one after another would), from an empty working folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_examples():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    assert "make_batches" in blocks[0] and "prune(" in blocks[0]  # the first example is whole


def test_every_readme_python_example_runs(tmp_path):
    blocks = python_blocks(README.read_text())
    script = ["import time as _t"]
    for i, block in enumerate(blocks):
        script.append(f"_s = _t.perf_counter()\n{block}")
        script.append(f"print('example {i + 1}: %.1f s' % (_t.perf_counter() - _s), flush=True)")
    (tmp_path / "examples.py").write_text("\n".join(script))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "examples.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    print(out.stdout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"example {len(blocks)}:" in out.stdout
    # what the examples print is what they claim: 50% after pruning, from 8 distinct batches,
    # and still 50% after two training steps with the masks attached
    pruned = re.search(r"^(\d\.\d+) sparse, (\d+) batches", out.stdout, flags=re.M)
    assert pruned and abs(float(pruned[1]) - 0.5) < 1e-3 and pruned[2] == "8", out.stdout
    kept = re.search(r"^(\d\.\d+) sparse after 2 steps", out.stdout, flags=re.M)
    assert kept and float(kept[1]) >= 0.5 - 1e-3, out.stdout
