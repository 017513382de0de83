"""Test tiers: each folder under tests/ is a tier with its own marker.

A tier skips only for a stated reason this machine cannot meet (`requires`).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

TIERS = ("unit", "kernel", "vm", "e2e", "bench")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@functools.lru_cache(maxsize=None)
def _bpf_lsm_loads() -> bool:
    from ebpf.probe import probe_lsm

    return probe_lsm().ok


def requires(*, root: bool = False, lsm: str | None = None, tool: str | None = None) -> pytest.MarkDecorator:
    """Skip on a missing capability, with the reason; never on a kernel version."""
    import shutil

    if root and os.geteuid() != 0:
        return pytest.mark.skip(reason="needs root (loads BPF programs)")
    if lsm == "bpf" and not (os.geteuid() == 0 and _bpf_lsm_loads()):
        return pytest.mark.skip(reason="BPF LSM programs do not load on this kernel (the vm tier covers them)")
    if tool and shutil.which(tool) is None:
        return pytest.mark.skip(reason=f"{tool} not installed (make setup installs it)")
    return pytest.mark.skipif(False, reason="capability present")
