"""Fault: a fork storm overruns the engine's ring buffer while a reader drains it (issue 28 §5).

The engine (tracepoint backend) runs with a one-page ring buffer (~17 records) and a reader thread
polling it as the daemon does, recording every event in a real measurement log (swtpm). Parallel
loops under an audit-mode TP label exec an unmeasured program (one violation record each) faster
than the reader keeps up. Then:
- the loss is counted in the kernel (cwl_drops) and becomes a lost-events entry in the log;
- every record that was read is in the log, in order, and the log replays to the PCR;
- the verifier's proof names the lost-events entry (reason "lost-events"): untrusted.
(tests/kernel/test_prima_bypass.py covers the engine with no reader at all.)
"""
from __future__ import annotations

import contextlib
import subprocess
import threading

import pytest

from controlplane.core import imalog
from controlplane.core.events import EventKind
from controlplane.core.keys import load_signing_key
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.store import Store
from tests.attest_fixtures import enforcement_started, reference, running_host  # noqa: F401
from tests.bypass.lab import Lab
from tests.conftest import requires
from tests.e2e.serve_process import HOST
from tests.tpm_fixtures import swtpm, swtpm_template, tpm  # noqa: F401

pytestmark = [requires(root=True), requires(tool="swtpm"), requires(tool="gcc"), pytest.mark.timeout(900)]
LOOPS, EXECS, STORMS = 4, 300, 10


def test_a_fork_storm_that_overruns_the_ring_buffer_is_a_lost_events_entry(tmp_path, tpm, reference) -> None:
    for d in ("host", "lab"):
        (tmp_path / d).mkdir()
    lab = Lab(tmp_path / "lab", backend="tracepoint", ringbuf_pages=1)
    key = load_signing_key(tmp_path / "verifier.key", create=True)
    ref = reference.open()
    recorded, stop = [], threading.Event()
    try:
        tp = lab.label(mode="audit")
        lab.engine.poll(0)
        with running_host(tmp_path / "host", tpm=tpm) as host, Store(f"sqlite:///{tmp_path}/a.db") as store, \
                contextlib.closing(ref.db):
            enforcement_started(host, reference)
            registrar.enrol(host.url, HOST, store)
            start = len(host.log.entries())

            def reader() -> None:                     # the daemon's loop: poll, record each event in the log
                while not stop.is_set():
                    for ev in lab.engine.poll(20):
                        host.log.record(ev)
                        recorded.append(ev)

            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            loop = f"i=0; while [ $i -lt {EXECS} ]; do {lab.untrusted}; i=$((i+1)); done"
            storms = 0
            while storms < STORMS and not any(e.kind is EventKind.LOST_EVENTS for e in recorded):
                procs = [subprocess.Popen([tp.entrypoint, "-c", loop]) for _ in range(LOOPS)]
                assert all(p.wait(300) == 0 for p in procs)
                storms += 1
            stop.set()
            thread.join(30)
            for ev in lab.engine.poll(100):
                host.log.record(ev)
                recorded.append(ev)
            host.log.flush()
            entries, pcr = host.log.entries(), tpm.read_pcr(host.log.pcr)   # nothing writes in between
            proof = verifier.attest(store.host(HOST), ref, key, store=store)
    finally:
        stop.set()
        lab.close()

    lost = [e for e in recorded if e.kind is EventKind.LOST_EVENTS]
    assert lost and lost[0].detail.get("ringbuf", 0) > 0, f"{storms} storms of {LOOPS}x{EXECS} execs lost nothing"
    violations = sum(1 for e in recorded if e.kind is EventKind.VIOLATION)
    assert violations < storms * LOOPS * EXECS                    # some records were lost...
    assert [e.name for e in entries[start:start + len(recorded)]] == [ev.ima_name() for ev in recorded]
    assert imalog.replay(entries, host.log.pcr) == pcr           # ...and what was read is all in the log
    flagged = [e for e in proof.document["entries"] if e["kind"] == "lost-events"]
    assert proof.verdict == "untrusted" and flagged and all(e["reason"] == "lost-events" for e in flagged)
