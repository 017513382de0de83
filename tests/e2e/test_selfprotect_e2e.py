"""A dead engine behind a live attestation service is in the proof (issue 22), tracepoint backend.

`cwlite serve --enforce` runs as a real process; a TP SIGKILLs it (the
tracepoint backend kills the sender, but cannot stop the signal); with the
engine gone a TP runs an unmeasured program freely; root then starts a plain
`cwlite serve` on the same log, TPM and port. The next proof must be
UNTRUSTED because no engine answered the verifier's nonce.
"""
from __future__ import annotations

import subprocess

import pytest

from controlplane.cli.demo import prepare
from controlplane.core import proof as proof_mod
from controlplane.core.keys import load_signing_key
from tests.conftest import requires
from tests.e2e.serve_process import attest, enrol, free_port, serve, serve_enforcing, stop_orphan_swtpm, verifier_of

pytestmark = [requires(root=True), requires(tool="swtpm"), pytest.mark.timeout(600)]


@pytest.fixture
def layout(tmp_path):
    layout = prepare(tmp_path, mode="enforce")
    yield layout
    stop_orphan_swtpm(layout)   # the killed service's swtpm outlives it (its own session, so PCRs survive a crash)


def test_a_tp_kills_the_daemon_and_the_next_proof_says_the_engine_is_dead(layout) -> None:
    port = free_port()
    run_tp = lambda cmd: subprocess.run([str(layout.entry), "-c", cmd], capture_output=True, text=True, timeout=60)
    with verifier_of(layout) as (store, key):
        with serve_enforcing(layout, port) as daemon:
            enrol(layout, port, store)
            first = attest(layout, store, key)
            assert first.verdict == "trusted", first.reasons
            assert any(v.kind == "engine-alive" and v.verdict == "info" for v in first.entries)
            assert run_tp(f"{layout.untrusted}; echo rc=$?").stdout.strip() == "rc=137"  # enforced

            r = run_tp(f"kill -KILL {daemon.pid}; echo rc=$?")
            assert r.returncode == -9 and "rc=" not in r.stdout   # the sender dies...
            assert daemon.wait(30) == -9                           # ...but a tracepoint cannot stop the signal
        # nothing enforces now: the unmeasured program runs under the TP label
        assert run_tp(f"{layout.untrusted}; echo rc=$?").stdout.strip() == "rc=0"
        with serve(layout, port, wait_for="cwlite serve:"):       # root brings up a service without an engine
            second = attest(layout, store, key)
    assert second.verdict == "untrusted"
    assert any("no engine-alive entry for this round's nonce" in r for r in second.reasons), second.reasons
    assert not any(r.startswith("reboot") for r in second.reasons), second.reasons
    pub = load_signing_key(layout.verifier_dir / "verifier.key").public_key()
    assert proof_mod.check(second.proof, pub)["verdict"] == "untrusted"
