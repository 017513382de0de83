"""`cwlite serve` as its own process (what systemd runs), for the e2e tests that kill and restart it.

    with serve(layout, port, "--enforce", "--backend", "tracepoint", wait_for="cwlite enforce: enforcing") as proc:
        ...                       # proc.pid can be SIGKILLed; the next `serve` restarts on the same data dir

The embedded swtpm runs in its own session and outlives a killed service (PCRs survive a daemon
crash); `stop_orphan_swtpm(layout)` stops it at the end of a test.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.cli.demo import POLICY, Layout
from controlplane.core.keys import load_signing_key
from controlplane.core.policy import load_policy
from controlplane.host.swtpm import Swtpm
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.store import Store, default_url
from prima.measuredb import MeasureDB
from prima.sources import build

CWLITE = str(Path(sys.executable).with_name("cwlite"))
HOST = "build-vm-1"
TOOLCHAIN = ["gcc-12", "make", "binutils", "dash", "coreutils"]
LABEL = "tp_build"


ENFORCING = "cwlite enforce: enforcing"


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


def serve_enforcing(layout: Layout, port: int):
    """`cwlite serve --enforce` on the tracepoint backend, once its engine enforces."""
    return serve(layout, port, "--enforce", "--backend", "tracepoint", wait_for=ENFORCING)


@contextlib.contextmanager
def verifier_of(layout: Layout) -> Iterator[tuple[Store, Ed25519PrivateKey]]:
    """The verifier's store (SQLite in its dir) and signing key (made on first use)."""
    with Store.open(default_url(layout.verifier_dir)) as store:
        yield store, load_signing_key(layout.verifier_dir / "verifier.key", create=True)


def enrol(layout: Layout, port: int, store: Store, *, name: str = HOST):
    """Enrol the service on `port` as the verifier does: EK certificate checked against the swtpm's CA."""
    cas = registrar.load_cas(sorted((layout.host_dir / "swtpm" / "ca").glob("*cert*.pem")))
    return registrar.enrol(f"https://127.0.0.1:{port}", name, store, cas=cas, require_ek_cert=True)


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


def toolchain_layout(work: Path) -> Layout:
    """A layout like the demo's, but the trust set is the Debian toolchain and the entrypoint is make."""
    tp_bin, verifier, host = work / "tp-bin", work / "verifier", work / "host"
    for d in (tp_bin, verifier, host):
        d.mkdir(parents=True)
    entry = tp_bin / "make"
    shutil.copy2("/usr/bin/make", entry)
    untrusted = work / "true"
    shutil.copy2("/usr/bin/true", untrusted)
    db, policy = host / "measure.db", host / "policy.toml"
    build(db, from_dpkg=TOOLCHAIN, deps=True, from_dir=[tp_bin], trust_set="toolchain", note="fault test toolchain")
    policy.write_text(POLICY.format(mode="enforce", trust_set="toolchain", label=LABEL, entry=entry))
    shutil.copy2(db, verifier / "measure.db")
    shutil.copy2(policy, verifier / "policy.toml")
    return Layout(work, entry, untrusted, db, policy, verifier / "measure.db", verifier / "policy.toml")
