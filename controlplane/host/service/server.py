"""Running the service: uvicorn over HTTPS with the fresh TLS identity, in a background thread."""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from controlplane.core.errors import CwliteError
from controlplane.host.service.routes import create_app
from controlplane.host.service.state import ServiceState


class Server:
    """`with Server(state) as s: s.url`: the service on `host:port` until the block ends.

    The TLS private key exists on disk only while uvicorn loads it (a private temp dir), then is removed.
    """

    def __init__(self, state: ServiceState, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self.state = state
        with tempfile.TemporaryDirectory(prefix="cwlite-tls-") as tmp:
            keyfile, certfile = Path(tmp) / "key.pem", Path(tmp) / "cert.pem"
            keyfile.touch(mode=0o600)
            keyfile.write_bytes(state.tls.key_pem)
            certfile.write_bytes(state.tls.cert_pem)
            self.config = uvicorn.Config(create_app(state), host=host, port=port, ssl_keyfile=str(keyfile),
                                         ssl_certfile=str(certfile), log_level=log_level, access_log=False,
                                         limit_concurrency=64, timeout_keep_alive=5, h11_max_incomplete_event_size=16384)
            self.config.load()
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="cwlite-service", daemon=True)

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
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://{self.config.host}:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
