"""controlplane.core.atomic: the one writer for files that must never be half-written."""
from __future__ import annotations

import os
import stat

import pytest

from controlplane.core.atomic import write_atomic


def test_replaces_whole_with_the_given_mode(tmp_path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"old", mode=0o644)
    assert path.read_bytes() == b"old" and stat.S_IMODE(path.stat().st_mode) == 0o644
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o600  # default: private


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # fails inside the write, after the temp file exists
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]
