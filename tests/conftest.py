"""Test tiers: each folder under tests/ is a tier with its own marker.

A tier skips only for a stated reason this machine cannot meet (`requires`).
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

from ebpf.probe import probe_lsm

TIERS = ("unit", "kernel", "vm", "e2e", "bench", "soak")
# Tests give every option they rely on: a machine's own /etc/cwlite/cwlite.toml (the .deb installs one)
# must not change their defaults. An empty file is an empty configuration.
os.environ.setdefault("CWLITE_CONFIG", os.devnull)
# A capability too costly to learn at import (it loads a program): checked when a test marked with it runs.
BPF_LSM_MARK = "cwlite_bpf_lsm"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{BPF_LSM_MARK}: needs BPF LSM programs to load (requires(lsm='bpf'))")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@functools.lru_cache(maxsize=None)
def _bpf_lsm_loads() -> bool:
    return os.geteuid() == 0 and probe_lsm().ok


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture: the lazy `requires(lsm="bpf")` check (one probe load per session)."""
    if item.get_closest_marker(BPF_LSM_MARK) and not _bpf_lsm_loads():
        pytest.skip("BPF LSM programs do not load on this kernel (the vm tier covers them)")


def requires(*, root: bool = False, lsm: str | None = None, tool: str | None = None) -> pytest.MarkDecorator:
    """Skip on a missing capability, with the reason; never on a kernel version.

    Root and tools are checked here; `lsm="bpf"` when a marked test is about to run, since
    learning it loads a program and importing a module must not.
    """
    if root and os.geteuid() != 0:
        return pytest.mark.skip(reason="needs root (loads BPF programs)")
    if tool and shutil.which(tool) is None:
        return pytest.mark.skip(reason=f"{tool} not installed (make setup installs it)")
    if lsm == "bpf":
        return getattr(pytest.mark, BPF_LSM_MARK)
    if lsm is not None:
        raise ValueError(f"requires(lsm={lsm!r}): only 'bpf' is known")
    return pytest.mark.skipif(False, reason="capability present")
