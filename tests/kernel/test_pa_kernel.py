"""Port Authority (tests/bypass/portauthority.py) on the host kernel: the tracepoint backend's cgroup
and tc programs refuse with EPERM or drop, and count what they refused."""
from __future__ import annotations

from tests.bypass.backend import TRACEPOINT
from tests.bypass.portauthority import PaScenarios, scenario_engines_reopened_decide_on_live_labels

pytestmark = list(TRACEPOINT.marks)


class TestTracepoint(PaScenarios):
    backend = TRACEPOINT


def test_engines_reopened_in_one_process_decide_on_live_labels(tmp_path) -> None:
    # after TestTracepoint's engines closed: the case bcc's "extern" table got wrong (a stale fd)
    scenario_engines_reopened_decide_on_live_labels(tmp_path, TRACEPOINT.name)
