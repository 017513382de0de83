"""Fault: the attestation service is SIGKILLed in the middle of a quote, then restarted (issue 28 §5).

`cwlite serve --enforce` answers a verifier's round; the moment the engine's liveness entry for
the round's nonce reaches the log file (the service is between that entry and TPM2_Quote), root
SIGKILLs it, then starts it again on the same data dir and port (as systemd's Restart= would).
- the interrupted round is stored as an "error" (unreachable at /v1/quote) and advances nothing;
- nothing lost or duplicated: the liveness entry written ahead is kept (extended at the restart if
  the kill came before its extend), and the next round replays every entry from where the last
  verified round ended to the quoted PCR value;
- the verifier sees what happened: a new TLS key entry, and the restart's second daemon-start
  (the embedded engine restarted with the service: an enforcement gap), so the proof is untrusted.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from controlplane.cli.demo import prepare
from controlplane.core import imalog
from controlplane.core.errors import VerifyError
from tests.conftest import requires
from tests.e2e.serve_process import HOST, attest, enrol, free_port, serve_enforcing, stop_orphan_swtpm, verifier_of

pytestmark = [requires(root=True), requires(tool="swtpm"), pytest.mark.timeout(900)]


def _kill_on_alive_entry(log_path: Path, start: int, proc, done: threading.Event) -> None:
    """SIGKILL `proc` as soon as an engine-alive entry past entry `start` is in the log file."""
    while not done.is_set():
        entries = imalog.scan_binary(log_path.read_bytes()).entries
        if any(e.index >= start and e.name.startswith("cwlite:engine-alive:") for e in entries):
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.001)


def test_a_service_killed_mid_quote_fails_that_round_only_and_loses_nothing(tmp_path: Path) -> None:
    layout = prepare(tmp_path, mode="enforce")
    log_path = layout.host_dir / "measurements.log"
    port = free_port()
    try:
        with verifier_of(layout) as (store, key):
            with serve_enforcing(layout, port) as proc:
                enrol(layout, port, store)
                first = attest(layout, store, key)
                assert first.verdict == "trusted", first.reasons

                done = threading.Event()
                killer = threading.Thread(target=_kill_on_alive_entry, args=(log_path, first.log_end, proc, done))
                killer.start()
                try:
                    with pytest.raises(VerifyError) as interrupted:
                        attest(layout, store, key)
                finally:
                    done.set()
                    killer.join()
                assert proc.wait(30) == -signal.SIGKILL
            at_kill = imalog.scan_binary(log_path.read_bytes()).entries

            with serve_enforcing(layout, port):
                second = attest(layout, store, key)
            verdicts = store.verdicts(HOST)
            after = imalog.parse_binary(log_path.read_bytes())
    finally:
        stop_orphan_swtpm(layout)

    assert interrupted.value.reason == "unreachable" and "/v1/quote" in str(interrupted.value)
    assert [(v.verdict, v.reason) for v in verdicts][:2] == [(second.verdict, second.reasons[0]), ("error", "unreachable")]
    assert after[: len(at_kill)] == at_kill and [e.index for e in after] == list(range(len(after)))
    assert second.log_start == first.log_end                      # the interrupted round advanced nothing
    kinds = {(v.kind, v.verdict, v.reason) for v in second.entries}
    assert ("engine-alive", "info", "") in kinds                  # the interrupted quote's liveness entry, kept
    assert ("tls-key", "info", "") in kinds                       # the restarted service's new key
    assert [(v.kind, v.reason) for v in second.entries if v.verdict == "untrusted"] == [("daemon-start", "enforcement-gap")]
    assert second.verdict == "untrusted"
