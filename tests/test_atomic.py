"""Atomic writes (busgen_lib/atomic.py): a file appears whole under its name, or the old one stays."""

import pytest

from busgen_lib.atomic import atomic_path, write_text_atomic


def test_the_file_appears_only_when_the_write_finishes(tmp_path):
    target = tmp_path / "scores.csv"
    with atomic_path(target) as tmp:
        tmp.write_text("a,b\n")
        assert not target.exists() and tmp.parent == tmp_path and tmp.name.startswith(".scores.csv.")
    assert target.read_text() == "a,b\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]  # no temporary left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "plan.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
