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
                source = Path(other.split(" ", 1)[1])
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
