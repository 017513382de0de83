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


@pytest.fixture(scope="session")
def host_root_files() -> None:
    """Expose the host's files without virtme's overlays on /usr and /usr/lib.

    With layers on different filesystems (9p below, tmpfs above), overlayfs
    reports the lower file's (dev, ino) to stat() while a mapped file's inode
    is the overlay's own: the measurement DB and the kernel would disagree
    about every system file. A lazy unmount lets new lookups reach 9p directly
    (running programs keep what they opened).
    """
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    # Newest first: /usr's overlay hides the /usr/lib one mounted before it.
    for _dev, target, fstype, *_ in reversed(mounts):
        if fstype == "overlay" and target in ("/usr", "/usr/lib"):
            subprocess.run(["umount", "-l", target], check=True)
