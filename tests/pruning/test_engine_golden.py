"""The pruning engine reproduces, bit for bit, the masks and weights it produced before its
refactor into parts (see engine_golden.py)."""

import pytest
import torch
from engine_golden import CASES, GOLDEN, case_key, run_case
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN)


@pytest.mark.parametrize("case", CASES, ids=[case_key(*c) for c in CASES])
def test_bitwise_identical(golden, case):
    got = run_case(*case)
    prefix = case_key(*case) + "/"
    want = {k[len(prefix) :]: v for k, v in golden.items() if k.startswith(prefix)}
    assert sorted(got) == sorted(want)
    assert any(v.sum() > 0 for k, v in got.items() if k.startswith("mask/"))
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), f"{k} differs from the golden engine output"
