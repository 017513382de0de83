"""Attestation test parts: a host (real swtpm + measurement log + HTTPS service on loopback),
the verifier's reference (policy + measurement DB built from real files), and a TLS relay.

Hostile hosts are built from the same real parts with one piece swapped (a TPM that
replays its first quote, a log that hides an entry): what a compromised host could do.
"""
from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from controlplane.core.events import Event, EventKind, alive_digest
from controlplane.core.policy import load_policy
from controlplane.host import mlog as mlog_mod
from controlplane.host.service import Server, ServiceState, TlsIdentity
from controlplane.host.tpm import open_tpm
from controlplane.verifier.judge import Reference as Ref
from prima.measuredb import MeasureDB
from prima.sources import build

POLICY = """\
mode = "audit"
backend = "tracepoint"
pcr = 10
trust_sets = ["toolchain"]

[labels.tp_build]
entrypoints = ["{entry}"]
trust_set = "toolchain"
"""


@dataclass
class Reference:
    """The verifier's own copies: policy text/path, the measurement DB, and the files it trusts."""

    policy_path: Path
    db_path: Path
    trusted: dict[str, bytes]        # path -> measurement
    entry: str

    def open(self, extra: frozenset[bytes] = frozenset()):
        return Ref(load_policy(self.policy_path), MeasureDB.open(self.db_path), extra)


def make_reference(base: Path) -> Reference:
    """A measurement DB (trust set "toolchain") built from a directory of real executables, and a policy."""
    tools = base / "tools"
    tools.mkdir(parents=True)
    trusted = {}
    for name in ("cc", "ld", "distccd"):
        p = tools / name
        p.write_bytes(b"#!/bin/sh\necho " + name.encode() + b"\n")
        p.chmod(0o755)
        trusted[str(p)] = hashlib.sha256(p.read_bytes()).digest()
    db = base / "trusted.db"
    build(db, from_dir=[tools], trust_set="toolchain", note="test tools")
    policy = base / "policy.toml"
    entry = str(tools / "distccd")
    policy.write_text(POLICY.format(entry=entry))
    return Reference(policy, db, trusted, entry)


@dataclass
class TestHost:
    """A running host: its TPM, measurement log, service state and URL."""

    tpm: Any
    log: Any
    state: ServiceState
    server: Server
    data_dir: Path

    @property
    def url(self) -> str:
        return self.server.url

    def record(self, kind: EventKind, digest: bytes = bytes(32), *, label="", op="", subject="") -> None:
        self.log.record(Event(kind, digest, label, op, subject), wait=True)


def enforcement_started(host: TestHost, ref: Reference) -> None:
    """What the enforcement engine writes when it starts: daemon-start, the policy and DB it loaded;
    and from then on, as a live engine does, its liveness entry for each quote's nonce."""
    with MeasureDB.open(ref.db_path) as db:
        db_digest = db.digest()
    host.record(EventKind.DAEMON_START, subject="cwlite enforce")
    host.record(EventKind.POLICY_LOAD, load_policy(ref.policy_path).digest(), subject=str(ref.policy_path))
    host.record(EventKind.DB_LOAD, db_digest, subject=str(ref.db_path))
    host.state.on_quote = lambda nonce: host.record(EventKind.ENGINE_ALIVE, alive_digest(nonce), op="alive",
                                                    subject="test engine events=0")


@contextlib.contextmanager
def running_host(data_dir: Path, *, tpm=None, log=None, policy_path: Path | None = None,
                 controller_key=None, db_digest: bytes | None = None, rate: float = 1000.0,
                 port: int = 0) -> Iterator[TestHost]:
    """swtpm (unless `tpm` is given) + measurement log + HTTPS service on 127.0.0.1:`port` (0: a free one)."""
    with contextlib.ExitStack() as stack:
        if tpm is None:
            tpm = stack.enter_context(open_tpm(data_dir))
        if log is None:
            log = mlog_mod.MeasurementLog.open(data_dir / "measurements.log", tpm, pcr=10)
        state = ServiceState(tpm=tpm, mlog=log, tls=TlsIdentity.fresh(), pcr=log.pcr, policy_path=policy_path,
                             controller_key=controller_key, db_digest=db_digest, rate_per_s=rate, burst=int(rate))
        state.record_tls_key()
        server = stack.enter_context(Server(state, port=port))
        yield TestHost(tpm, log, state, server, data_dir)


class Relay:
    """A TLS-terminating relay with its OWN fresh certificate in front of a service (a man in the middle).

    It forwards bytes both ways unchanged: the quote it passes on is genuine and fresh,
    but bound to the service's key, not to the key the verifier's TLS connection sees.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        ident = TlsIdentity.fresh()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "k").write_bytes(ident.key_pem)
            (Path(tmp) / "c").write_bytes(ident.cert_pem)
            self.ctx.load_cert_chain(Path(tmp) / "c", Path(tmp) / "k")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "Relay":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.sock.close()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        """Accept connections; each is relayed by its own thread, so a slow or stalled handshake
        never holds up the next connection."""
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        client_ctx = ssl.create_default_context()
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        try:
            down = self.ctx.wrap_socket(conn, server_side=True)
            up = client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.upstream)))
        except (OSError, ssl.SSLError):
            conn.close()
            return
        for a, b in ((down, up), (up, down)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


@pytest.fixture
def reference(tmp_path) -> Reference:
    return make_reference(tmp_path / "verifier")
