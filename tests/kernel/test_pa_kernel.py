"""Port Authority (tests/bypass/portauthority.py) on the host kernel: the tracepoint backend's cgroup
and tc programs refuse with EPERM or drop, and count what they refused."""
from __future__ import annotations

from tests.bypass.backend import TRACEPOINT
from tests.bypass.portauthority import PaScenarios

pytestmark = list(TRACEPOINT.marks)


class TestTracepoint(PaScenarios):
    backend = TRACEPOINT
