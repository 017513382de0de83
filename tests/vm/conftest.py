"""The vm tier on the host: guest-side files run only inside the VM.

`tests/vm/guest/` (and `guest_ima/`, booted with the kernel's IMA measuring) hold plain pytest files that the host never collects: one
host-side module (test_vm_tier.py) boots the VM once, runs that whole folder
inside it, and reports each guest test as a host test. The guest run sets
CWLITE_VM_GUEST=1, which lifts the exclusion.
"""
from __future__ import annotations

import os

import pytest

GUEST_ENV = "CWLITE_VM_GUEST"

collect_ignore = [] if os.environ.get(GUEST_ENV) else ["guest", "guest_ima"]

# Facts the guest recorded (kernel, backend, timings), printed at the end of the run.
VM_FACTS = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    facts = config.stash.get(VM_FACTS, None)
    if facts:
        terminalreporter.section("vm tier")
        for key, value in facts.items():
            terminalreporter.write_line(f"{key}: {value}")
