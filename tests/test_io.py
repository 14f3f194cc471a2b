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
