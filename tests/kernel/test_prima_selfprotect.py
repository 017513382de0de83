"""Enforcement protects itself (tests/bypass/selfprotect.py) on the host kernel: the tracepoint backend
kills the attacker at the syscall's entry and logs the attack."""
from __future__ import annotations

from tests.bypass.backend import TRACEPOINT
from tests.bypass.selfprotect import SelfProtectScenarios
from tests.conftest import requires

pytestmark = [*TRACEPOINT.marks, requires(tool="bpftool")]


class TestTracepointSelfProtect(SelfProtectScenarios):
    backend = TRACEPOINT
