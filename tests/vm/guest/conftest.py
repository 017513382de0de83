"""Guest-side fixtures: these tests run as root INSIDE the VM booted by tests/vm/harness.py.

The guest root is the host's, read-only over 9p, with tmpfs overlays on /tmp
and friends; only the results dir (CWLITE_VM_RESULTS) reaches the host.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def results_dir() -> Path:
    """Where a guest test may leave files for the host (the VM's --rwdir)."""
    return Path(os.environ["CWLITE_VM_RESULTS"])


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A fresh tmpfs: a real local filesystem with stable (dev, ino), unlike the 9p root or /tmp's overlay."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "cwlite-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
