"""`cwlite serve` as its own process (what systemd runs), for the e2e tests that kill and restart it.

    with serve(layout, port, "--enforce", "--backend", "tracepoint", wait_for="cwlite enforce: enforcing") as proc:
        ...                       # proc.pid can be SIGKILLed; the next `serve` restarts on the same data dir

The embedded swtpm runs in its own session and outlives a killed service (PCRs survive a daemon
crash); `stop_orphan_swtpm(layout)` stops it at the end of a test.
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

from controlplane.cli.demo import Layout
from controlplane.core.policy import load_policy
from controlplane.host.swtpm import Swtpm
from controlplane.verifier import attest as verifier
from controlplane.verifier.store import Store
from prima.measuredb import MeasureDB

CWLITE = str(Path(sys.executable).with_name("cwlite"))
HOST = "build-vm-1"


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(layout: Layout, port: int, *extra: str, wait_for: str, timeout: float = 300) -> Iterator[subprocess.Popen]:
    """`cwlite serve` on the layout's host dir, policy and DB, until its stderr says `wait_for`;
    SIGTERM (then SIGKILL) at the end if it still runs."""
    proc = subprocess.Popen([CWLITE, "serve", "--data-dir", str(layout.host_dir), "--port", str(port),
                             "--policy", str(layout.policy), "--db", str(layout.db), *extra],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
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


def attest(layout: Layout, store: Store, key, *, name: str = HOST) -> verifier.Attestation:
    """One round against the enrolled host, judged with the verifier's own copies of policy and DB."""
    ref = verifier.Reference(load_policy(layout.verifier_policy), MeasureDB.open(layout.verifier_db))
    try:
        return verifier.attest(store.host(name), ref, key, store=store)
    finally:
        ref.db.close()


def stop_orphan_swtpm(layout: Layout) -> None:
    """Stop the swtpm a killed service left running (its data dir is host/swtpm)."""
    orphan = Swtpm.attach(layout.host_dir / "swtpm")
    if orphan is not None:
        os.kill(orphan.pid, signal.SIGTERM)
