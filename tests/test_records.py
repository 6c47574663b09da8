"""Atomic writes: whole files only, with the mode a plain open() would give."""

from __future__ import annotations

import os
import stat

from kdgap.io import atomic_write_json, atomic_write_text, file_mode


def test_atomic_writes_use_the_umask_mode_and_leave_no_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        assert file_mode() == 0o644
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_write_text(tmp_path / "b.txt", "hi\n")
        for name in ("a.json", "b.txt"):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644  # mkstemp: 0o600
        os.umask(0o077)
        assert file_mode() == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt"]
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
