"""A dead engine behind a live attestation service is in the proof (issue 22), tracepoint backend.

`cwlite serve --enforce` runs as a real process; a TP SIGKILLs it (the
tracepoint backend kills the sender, but cannot stop the signal); with the
engine gone a TP runs an unmeasured program freely; root then starts a plain
`cwlite serve` on the same log, TPM and port. The next proof must be
UNTRUSTED because no engine answered the verifier's nonce.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from controlplane.cli.demo import Layout, prepare
from controlplane.core import proof as proof_mod
from controlplane.core.keys import load_signing_key
from controlplane.core.policy import load_policy
from controlplane.host.swtpm import Swtpm
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.store import Store, default_url
from prima.measuredb import MeasureDB
from tests.conftest import requires

pytestmark = [requires(root=True), requires(tool="swtpm"), pytest.mark.timeout(600)]

CWLITE = str(Path(sys.executable).with_name("cwlite"))


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(layout: Layout, port: int, *extra: str, wait_for: str) -> Iterator[subprocess.Popen]:
    """`cwlite serve` as its own process, until its stderr says `wait_for`."""
    proc = subprocess.Popen([CWLITE, "serve", "--data-dir", str(layout.host_dir), "--port", str(port),
                             "--policy", str(layout.policy), "--db", str(layout.db), *extra],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        seen = []
        while wait_for not in "".join(seen):
            line = proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise AssertionError(f"cwlite serve: {wait_for!r} not seen: {''.join(seen)}")
            seen.append(line)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _attest(layout: Layout, store: Store, key):
    ref = verifier.Reference(load_policy(layout.verifier_policy), MeasureDB.open(layout.verifier_db))
    try:
        return verifier.attest(store.host("build-vm-1"), ref, key, store=store)
    finally:
        ref.db.close()


@pytest.fixture
def layout(tmp_path):
    layout = prepare(tmp_path, mode="enforce")
    yield layout
    # the killed service's swtpm outlives it (its own session, so PCRs survive a daemon crash): stop it
    orphan = Swtpm.attach(layout.host_dir / "swtpm")
    if orphan is not None:
        os.kill(orphan.pid, signal.SIGTERM)


def test_a_tp_kills_the_daemon_and_the_next_proof_says_the_engine_is_dead(layout) -> None:
    port = _free_port()
    run_tp = lambda cmd: subprocess.run([str(layout.entry), "-c", cmd], capture_output=True, text=True, timeout=60)
    with Store.open(default_url(layout.verifier_dir)) as store:
        key = load_signing_key(layout.verifier_dir / "verifier.key", create=True)
        with _serve(layout, port, "--enforce", "--backend", "tracepoint", wait_for="cwlite enforce: enforcing") as daemon:
            cas = registrar.load_cas(sorted((layout.host_dir / "swtpm" / "ca").glob("*cert*.pem")))
            registrar.enrol(f"https://127.0.0.1:{port}", "build-vm-1", store, cas=cas, require_ek_cert=True)
            first = _attest(layout, store, key)
            assert first.verdict == "trusted", first.reasons
            assert any(v.kind == "engine-alive" and v.verdict == "info" for v in first.entries)
            assert run_tp(f"{layout.untrusted}; echo rc=$?").stdout.strip() == "rc=137"  # enforced

            r = run_tp(f"kill -KILL {daemon.pid}; echo rc=$?")
            assert r.returncode == -9 and "rc=" not in r.stdout   # the sender dies...
            assert daemon.wait(30) == -9                           # ...but a tracepoint cannot stop the signal
        # nothing enforces now: the unmeasured program runs under the TP label
        assert run_tp(f"{layout.untrusted}; echo rc=$?").stdout.strip() == "rc=0"
        with _serve(layout, port, wait_for="cwlite serve:"):       # root brings up a service without an engine
            second = _attest(layout, store, key)
    assert second.verdict == "untrusted"
    assert any("no engine-alive entry for this round's nonce" in r for r in second.reasons), second.reasons
    assert not any(r.startswith("reboot") for r in second.reasons), second.reasons
    pub = load_signing_key(layout.verifier_dir / "verifier.key").public_key()
    assert proof_mod.check(second.proof, pub)["verdict"] == "untrusted"
