"""Every table of README.md and docs/ says where its numbers come from, and the generated ones
equal their regeneration from the raw files beside them (scripts/tables.py)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import tables  # noqa: E402


def test_every_table_has_a_marker_and_every_generated_table_is_its_regeneration():
    assert tables.run(write=False) == []


def test_generated_tables_exist_and_the_check_catches_a_changed_number(tmp_path):
    """A copy of each page with a generated table, its raw files beside it as in docs/, and one
    digit of the table changed: the check reports that table."""
    marked = [
        (page, start, marker)
        for page in tables.pages()
        for start, _, marker in tables.tables(page)
        if marker and marker.split()[0] in tables.KINDS
    ]
    assert len(marked) >= 2, marked
    for k, (page, start, _) in enumerate(marked):
        folder = tmp_path / str(k)
        for _, _, other in tables.tables(page):  # the raw files of every generated table there
            if other and other.split()[0] in tables.KINDS:
                source = Path(other.split()[1])  # KIND SOURCE [SELECTOR]
                (folder / source.parent).mkdir(parents=True, exist_ok=True)
                for f in (page.parent / source.parent).glob(source.stem + "*"):
                    (folder / source.parent / f.name).write_bytes(f.read_bytes())
        lines = page.read_text().splitlines()
        copy = folder / page.name
        copy.write_text("\n".join(lines) + "\n")
        assert tables.run(write=False, only=[copy]) == []
        row = lines[start + 3]  # the second data row (header, separator, first row before it)
        changed = re.sub(r"(\d)(?=\D*$)", lambda m: str((int(m.group(1)) + 1) % 10), row, count=1)
        assert changed != row
        lines[start + 3] = changed
        copy.write_text("\n".join(lines) + "\n")
        problems = tables.run(write=False, only=[copy])
        assert problems and "differs from" in problems[0], problems


def test_measured_markers_name_a_commit_of_this_repository():
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True
    )
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("not a full git checkout: the commits cannot be looked up")
    for page in tables.pages():
        for _, _, marker in tables.tables(page):
            m = re.match(r"measured at commit ([0-9a-f]{7,40});", marker or "")
            if m:
                r = subprocess.run(["git", "cat-file", "-e", m.group(1) + "^{commit}"], cwd=ROOT)
                assert r.returncode == 0, (page.name, marker)


def test_a_marker_whose_raw_file_is_missing_is_one_problem_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- table: bench-kernels missing.json -->\n| a |\n|---|\n| 1 |\n")
    assert tables.run(write=False, only=[page]) == [
        f"{page}:2: `bench-kernels missing.json`: no such file missing.json"
    ]


def test_a_selector_picks_one_of_the_tables_of_a_raw_file(tmp_path):
    """``KIND SOURCE SELECTOR``: the stage table of run 1, and the same run extrapolated."""
    import json

    run = {
        "title": "t",
        "rows": [{"stage": "scoring", "seconds": 2.0, "peak_bytes": 2**30}],
        "base_rss": 2**30,
        "curvature": 2**30,
        "total": 2**31,
    }
    other = dict(run, rows=[{"stage": "scoring", "seconds": 5.0, "peak_bytes": 2**30}])
    (tmp_path / "raw.json").write_text(json.dumps({"runs": [run, other]}))
    page = tmp_path / "page.md"
    one = tables.generated(page, "pruning-stages raw.json 1")
    twelve = tables.generated(page, "pruning-stages raw.json 1x12")
    assert "| scoring | 5.0 | 1.00 |" in one
    assert "| scoring | 60.0 | - |" in twelve and "| memory plan (x12): peak | | 24.00 |" in twelve


@pytest.mark.parametrize(
    "x, text",
    [(28.2818, "28.28"), (110.93, "110.9"), (1303.4, "1,303"), (90384.2, "90,384"),
     (999.96, "1,000"), (99.996, "100.0"), (9.99996, "10.00"), (0.9708, "0.9708")],
)  # fmt: skip
def test_four_significant_digits_also_when_rounding_carries(x, text):
    assert tables._sig(x) == text


def test_a_grid_of_gradual_points_says_its_seconds_include_the_training(tmp_path):
    """A gradual point's ``prune_seconds`` is the whole run (pruning steps and the training
    between and after them), a one-shot point's the pruning alone: the column says which."""
    import json

    dense = {"method": "dense", "mode": "-", "mask": "-", "target_sparsity": 0.0,
             "accuracy": 0.97, "prune_seconds": 0.0}  # fmt: skip
    point = {"method": "obs", "mask": "unstructured", "target_sparsity": 0.5, "accuracy": 0.96}
    rows = [dense, dict(point, mode="oneshot", prune_seconds=60.0)]
    (tmp_path / "oneshot.json").write_text(json.dumps(rows))
    (tmp_path / "both.json").write_text(
        json.dumps(rows + [dict(point, mode="gradual", prune_seconds=300.0)])
    )
    one = tables.sweep_grid(tmp_path / "oneshot.json").splitlines()[0]
    both = tables.sweep_grid(tmp_path / "both.json").splitlines()
    assert one.endswith("| prune seconds a point |")
    assert both[0].endswith("| prune seconds a point (gradual: the whole run, training included) |")
    assert both[2] == "| obs | 0.9600 | 0.9600 | 60-300 |"
