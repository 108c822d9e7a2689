"""The time-to-target bookkeeping of ``scripts/bench_optim.py --part target`` on runs written by
hand: the target is tuned AdamW's worst seed, an optimizer is "sooner" only when its slowest seed
beats AdamW's fastest, and a missed target is counted, never averaged in."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_optim  # noqa: E402


def _run(seed, accs, per_step=1.0):
    curve = [
        {"step": 10 * (i + 1), "seconds": 10 * (i + 1) * per_step, "accuracy": a}
        for i, a in enumerate(accs)
    ]
    return {"seed": seed, "curve": curve, "accuracy": accs[-1], "seconds_per_step": per_step,
            "peak_bytes": 2**30, "lr": 1e-3}  # fmt: skip


def _file():
    runs = {
        # AdamW tuned: its finals 0.95, 0.92, 0.96: the target is 0.92
        "adamw|0|0.001": _run(0, [0.5, 0.80, 0.93, 0.95]),
        "adamw|1|0.001": _run(1, [0.5, 0.70, 0.90, 0.92]),
        "adamw|2|0.001": _run(2, [0.5, 0.85, 0.94, 0.96]),
        # reaches 0.92 at step 20 on every seed, at 1.2 s a step: 24 s against AdamW's 30-40
        "fast:k=2|0|0.01": _run(0, [0.6, 0.93, 0.95, 0.96], 1.2),
        "fast:k=2|1|0.01": _run(1, [0.6, 0.92, 0.95, 0.96], 1.2),
        "fast:k=2|2|0.01": _run(2, [0.6, 0.94, 0.95, 0.96], 1.2),
        # at step 20 too, but at 2 s a step: 40 s, inside AdamW's spread
        "slow|0|0.01": _run(0, [0.6, 0.93, 0.95, 0.96], 2.0),
        "slow|1|0.01": _run(1, [0.6, 0.93, 0.95, 0.96], 2.0),
        "slow|2|0.01": _run(2, [0.6, 0.93, 0.95, 0.96], 2.0),
        # one seed never gets there
        "miss|0|0.01": _run(0, [0.6, 0.93, 0.95, 0.96]),
        "miss|1|0.01": _run(1, [0.6, 0.80, 0.85, 0.91]),
        "miss|2|0.01": _run(2, [0.6, 0.93, 0.95, 0.96]),
        "broken|0|0.01": {"error": "RuntimeError: out of memory"},
    }
    chosen = {n.split("|")[0].split(":")[0]: {"name": n.split("|")[0], "lr": float(n.split("|")[2])}
              for n in runs}  # fmt: skip
    return {"setup": "minilm", "spec": {"metric": "accuracy", "steps": 40}, "runs": runs,
            "chosen": chosen, "settings_from": "elsewhere.json"}  # fmt: skip


def test_target_is_adamw_worst_seed_and_comparisons_use_the_seed_spread():
    target, rows = bench_optim.target_rows(_file())
    assert target == pytest.approx(0.92)
    by = {r["optimizer"]: r for r in rows}
    assert by["adamw"]["steps"] == [30, 40, 30] and by["adamw"]["reached"] == 3
    assert by["fast"]["steps"] == [20, 20, 20]
    assert by["fast"]["seconds"] == pytest.approx([24.0, 24.0, 24.0])
    assert by["fast"]["against_adamw"] == "sooner, beyond the spread"
    assert by["slow"]["against_adamw"] == "within the spread"
    assert by["miss"]["reached"] == 2
    assert by["miss"]["against_adamw"] == "later (target missed on 1 seed)"
    assert by["broken"]["error"].startswith("RuntimeError")
    # final accuracy's 95% interval over 3 seeds: t(2) = 4.303
    assert by["adamw"]["final_half"] == pytest.approx(4.303 * 0.0208167 / 3**0.5, rel=1e-4)


def test_target_table_lists_every_optimizer_with_its_setting():
    lines = bench_optim.target_tables(_file())
    assert "seeds reaching accuracy >= 0.9200 (AdamW's worst seed at step 40)" in lines[0]
    row = next(x for x in lines if x.startswith("| fast |"))
    assert "k=2, 0.01" in row and "3 of 3" in row and "| 1.39 |" in row  # 33.3 s / 24 s
    assert any(x.startswith("| broken | error: RuntimeError") for x in lines)


def test_a_setting_parses_numbers_and_pairs():
    assert bench_optim._number("16") == 16
    assert bench_optim._number("1e-4") == 1e-4  # was int("1e-4"): a ValueError
    assert bench_optim._number("0.9/0.99") == (0.9, 0.99)


def test_tuning_table_lists_rate_and_setting_probes_and_the_choice():
    out = _file()
    out["runs"]["fast|0|0.003"] = _run(0, [0.5, 0.6, 0.7, 0.8])
    lines = bench_optim.target_tuning_table(out)
    row = next(x for x in lines if x.startswith("| fast |"))
    assert "| 0.003: 0.800 | k=2: 0.960 | fast:k=2, lr 0.01 |" in row
