"""The memory plan of a pruning step counts every large buffer: its estimate is within 25% of
the peak memory measured in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

MEASURE = r"""
import gc, json, sys
import psutil, torch
from curvature.cli.utils import peak_memory_bytes, reset_peak_memory
from curvature.pruning import prune
from curvature.pruning.parts import OBS

selection, dtype, block, num_grads = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
x = torch.randn(num_grads, 8, 512)
data = [(x[i], x[i].sum(1)) for i in range(num_grads)]
def loss(m, b):
    return ((m(b[0]).sum(1) - b[1]) ** 2).mean()
gc.collect()
base = psutil.Process().memory_info().rss
reset_peak_memory()
obs = OBS(gradients=num_grads, block_size=block, fisher_damping=1e-4, selection=selection, dtype=dtype)
r = prune(model, data, loss_fn=loss, sparsity=0.5, method=obs, progress=False, params=["re:.*weight"])
print(json.dumps({"plan": r.memory_plan, "peak": peak_memory_bytes() - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS reset")
@pytest.mark.parametrize(
    "selection,dtype,block,num_grads",
    [
        ("independent", "float64", 64, 64),  # Woodbury blocks, float64 storage
        ("greedy", "float64", 32, 64),
        ("independent", "float32", 64, 64),  # float32 storage: float64 chunk copies
        ("independent", "float64", 128, 32),  # M-FAC form: blocks materialised when read
    ],
)
def test_plan_is_within_25_percent_of_the_measured_peak(selection, dtype, block, num_grads):
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, selection, dtype, str(block), str(num_grads)],
        capture_output=True, text=True, timeout=900, check=True,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    plan, peak = got["plan"]["total"], got["peak"]
    assert got["plan"]["curvature"] > 0.2 * plan  # the buffers are large enough to measure
    assert 0.75 <= plan / peak <= 1.25, (plan / peak, got["plan"])
