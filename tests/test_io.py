"""Atomic writes: all or nothing, with the permissions the user's umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from raysl.io import write_json, write_npz, write_text, write_with


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_get_the_umask_permissions(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        for p in (write_text(tmp_path / "a.txt", "x"), write_json(tmp_path / "b.json", {}),
                  write_npz(tmp_path / "c.npz", a=__import__("numpy").zeros(2))):
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = write_text(tmp_path / "t.txt", "old")

    def boom(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_with(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_atomic_dir_replaces_whole_keeps_a_concurrent_one_and_leaves_nothing_on_error(
        tmp_path: Path) -> None:
    from raysl.io import atomic_dir

    out = tmp_path / "parts"
    for content in ("first", "second"):  # a second write replaces the first, whole
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text(content)
            if content == "first":
                (tmp / "b.txt").write_text("only in the first")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert (out / "a.txt").read_text() == "second"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    with atomic_dir(out, keep_existing=True) as tmp:  # one is there already: kept
        (tmp / "a.txt").write_text("third")
    assert (out / "a.txt").read_text() == "second"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("broken")
        raise RuntimeError("the writer failed")
    assert (out / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]  # no temporary left
