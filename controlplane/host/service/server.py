"""Running the service: uvicorn over HTTPS with the fresh TLS identity, in a background thread."""
from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from controlplane.core.errors import CwliteError
from controlplane.host.service.routes import create_app
from controlplane.host.service.state import ServiceState

HEADER_TIMEOUT_S = 10.0          # a request's headers must arrive within this (slowloris)
PER_CLIENT_CONNECTIONS = 32      # open connections one client address may hold
MAX_CONNECTIONS = 1024           # all clients: beyond this uvicorn answers 503


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the two bounds it lacks, so one client cannot starve the verifier.

    uvicorn times out idle keep-alive connections only after a first response, and counts every open
    connection against its concurrency limit: 64 connections that trickle a header a byte at a time
    (slowloris) made every other client, the verifier included, get 503 for as long as they stayed.
    Here each request's headers must be complete within HEADER_TIMEOUT_S, and a client address holding
    PER_CLIENT_CONNECTIONS connections has its next one closed at once.
    """

    header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        addr = self.client[0] if self.client else None
        if addr is not None and sum(1 for c in self.connections if c.client and c.client[0] == addr) > PER_CLIENT_CONNECTIONS:
            # out of the concurrency count NOW: a burst of connects is accepted before any close completes,
            # and uvicorn counts open connections against MAX_CONNECTIONS (503 to everyone, the verifier too)
            self.connections.discard(self)
            transport.abort()
            return
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:        # a whole request (its headers) arrived
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        self._arm_deadline()               # the next request's headers are due in time too
        super().on_response_complete()

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self.header_deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _cancel_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or one CwliteError line (not uvicorn's log line and then ours)."""
    try:
        family, _type, _proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise CwliteError(f"attestation service: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CwliteError(f"attestation service: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


class Server:
    """`with Server(state) as s: s.url`: the service on `host:port` until the block ends.

    The port is bound when the Server is made, before anything is served or recorded: a caller
    records the TLS key only for a service that can actually listen. The TLS private key exists
    on disk only while uvicorn loads it (a private temp dir), then is removed.
    """

    def __init__(self, state: ServiceState, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self.state = state
        self.sock = listen(host, port)
        with tempfile.TemporaryDirectory(prefix="cwlite-tls-") as tmp:
            keyfile, certfile = Path(tmp) / "key.pem", Path(tmp) / "cert.pem"
            keyfile.touch(mode=0o600)
            keyfile.write_bytes(state.tls.key_pem)
            certfile.write_bytes(state.tls.cert_pem)
            self.config = uvicorn.Config(create_app(state), host=host, port=port, ssl_keyfile=str(keyfile),
                                         ssl_certfile=str(certfile), log_level=log_level, access_log=False,
                                         http=GuardedH11, limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5,
                                         h11_max_incomplete_event_size=16384)
            try:
                self.config.load()
            except BaseException:
                self.sock.close()
                raise
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="cwlite-service", daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise CwliteError(f"attestation service: could not listen on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://{self.config.host}:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
