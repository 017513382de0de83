"""Fault: the enforcement daemon is SIGKILLed while a compile runs under a TP label (issue 28 §5).

`cwlite serve --enforce` (tracepoint backend) enforces a toolchain trust set; `make -j2` of a C
project runs under the label; root SIGKILLs the daemon mid-compile and starts it again (what
systemd's Restart= does). Then:
- nothing lost: every entry the log file held at the kill is still there, unchanged, in order;
- nothing duplicated: indices are contiguous and the verifier replays the whole log to the quoted
  PCR value (an entry extended twice, or not at all, could not reach it);
- the restart is a second daemon-start entry, judged "enforcement-gap": the proof is untrusted;
- after the restart the compile is enforced again and finishes without a violation.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from controlplane.core import imalog
from controlplane.host.mlog import read_log
from tests.bypass.lab import c_project
from tests.conftest import requires
from tests.e2e.serve_process import (attest, enrol, free_port, serve_enforcing, stop_orphan_swtpm, toolchain_layout,
                                     verifier_of)

pytestmark = [requires(root=True), requires(tool="swtpm"), requires(tool="gcc"), pytest.mark.timeout(1200)]


def _logged(path: Path) -> list[imalog.LogEntry]:
    """The whole entries in the log file now (a torn last append, if any, left out)."""
    return imalog.scan_binary(path.read_bytes(), source=str(path)).entries


def _wait_logged(path: Path, pred, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(pred(e) for e in _logged(path)):
        assert time.monotonic() < deadline, f"{what} not logged in {timeout} s"
        time.sleep(0.05)


def test_a_daemon_killed_mid_compile_restarts_with_a_gap_entry_and_loses_nothing(tmp_path: Path) -> None:
    layout = toolchain_layout(tmp_path / "work")
    src = c_project(tmp_path)
    make = [str(layout.entry), "-s", "-B", "-j2", "-C", str(src)]
    log_path = layout.host_dir / "measurements.log"
    port = free_port()
    try:
        with verifier_of(layout) as (store, key):
            with serve_enforcing(layout, port) as daemon:
                enrol(layout, port, store)
                first = attest(layout, store, key)
                assert first.verdict == "trusted", first.reasons

                compile_ = subprocess.Popen(make, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                _wait_logged(log_path, lambda e: e.index >= first.log_end and e.name.endswith("/cc1"),
                             "the compile's first cc1 load")
                daemon.send_signal(signal.SIGKILL)
                assert daemon.wait(30) == -signal.SIGKILL
                at_kill = _logged(log_path)
            _out, err = compile_.communicate(timeout=600)
            assert compile_.returncode == 0, err          # unenforced during the gap, but it ran on

            with serve_enforcing(layout, port):
                second = attest(layout, store, key)
                r = subprocess.run(make, capture_output=True, text=True, timeout=600)
                assert r.returncode == 0, r.stderr
                third = attest(layout, store, key)
            after = read_log(log_path)
    finally:
        stop_orphan_swtpm(layout)

    # nothing lost, nothing duplicated
    assert after[: len(at_kill)] == at_kill
    assert [e.index for e in after] == list(range(len(after)))
    assert first.log_end <= len(at_kill) and second.log_start == first.log_end and third.log_start == second.log_end
    starts = [e.index for e in after if e.name.startswith("cwlite:daemon-start:")]
    assert len(starts) == 2 and starts[1] >= len(at_kill)
    # the verifier sees the gap, and only the gap
    assert second.verdict == "untrusted" and third.verdict == "untrusted"   # a gap stays in every later proof
    flagged = [(v.index, v.reason) for v in second.entries if v.verdict == "untrusted"]
    assert flagged == [(starts[1], "enforcement-gap")], flagged
    assert not [v for v in third.entries if v.verdict == "untrusted"], "the enforced compile had a violation"
