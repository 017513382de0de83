"""The host's local control socket: other cwlite commands record into the log `cwlite serve` holds.

The measurement log has one writer (flock), the serving process. `cwlite vm up`
is another process, so it hands its entries (the VM's boot parts and vTPM
record) to that writer over a Unix socket under the data dir, mode 0600 (root
only, as the log itself). Only the kinds in ACCEPTED are taken: the socket is
not a way to write enforcement events. One JSON line per request and answer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Iterator, Sequence

from controlplane.core.errors import CwliteError, LogError
from controlplane.core.events import Event, EventKind

SOCKET_NAME = "control.sock"
SHORT_DIR = Path("/run/cwlite")           # where the socket goes when the data dir's path is too long for AF_UNIX
_SUN_PATH_MAX = 107                       # sockaddr_un.sun_path: 108 bytes with the NUL
ACCEPTED = frozenset({EventKind.VM_PART, EventKind.VM_VTPM})
_MAX_REQUEST = 1 << 16
_TIMEOUT = 60.0


def socket_path(data_dir: Path) -> Path:
    """DATA/control.sock, or (a data dir path too long for a Unix socket) /run/cwlite/control-HASH.sock."""
    data_dir = Path(data_dir).resolve()
    path = data_dir / SOCKET_NAME
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path
    SHORT_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SHORT_DIR / f"control-{hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:24]}.sock"


def _event_of(item: dict) -> Event:
    try:
        kind = EventKind(item["kind"])
        event = Event(kind, bytes.fromhex(item["digest"]), op=str(item.get("op", "")), subject=str(item["subject"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise LogError(f"control request: malformed event ({exc})") from exc
    if kind not in ACCEPTED or len(event.digest) != 32:
        raise LogError(f"control request: {kind.value} entries are not accepted here (only "
                       f"{', '.join(sorted(k.value for k in ACCEPTED))})")
    return event


class ControlServer:
    """Accepts record requests on `path` for `log` (a host.mlog.MeasurementLog) in a daemon thread."""

    def __init__(self, path: Path, log) -> None:
        self.path = Path(path)
        self.log = log
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()              # a stale socket of a dead serve (the log's flock says we are the writer)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="cwlite-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return                      # closed
            with conn:
                conn.settimeout(_TIMEOUT)
                try:
                    answer = self._handle(_read_line(conn))
                except (CwliteError, OSError, ValueError) as exc:
                    answer = {"error": str(exc)}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(answer).encode() + b"\n")

    def _handle(self, line: bytes) -> dict:
        request = json.loads(line)
        events = [_event_of(item) for item in request.get("events", [])]
        entries = [self.log.record(e, wait=True) for e in events]    # in the PCR before we answer
        return {"entries": [{"index": e.index, "pcr": e.pcr, "name": e.name} for e in entries]}

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_REQUEST:
            raise LogError(f"control request: over {_MAX_REQUEST} bytes")
    return data


class ControlClient:
    """Records events through the serving process's control socket (same `record` shape as MeasurementLog)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def record_all(self, events: Sequence[Event]) -> list[dict]:
        """Record `events` in order; returns each entry's index, PCR and name once the PCR holds them all."""
        body = {"events": [{"kind": e.kind.value, "digest": e.digest.hex(), "op": e.op, "subject": e.subject}
                           for e in events]}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(_TIMEOUT)
                s.connect(str(self.path))
                s.sendall(json.dumps(body).encode() + b"\n")
                answer = json.loads(_read_line(s) or b"{}")
        except (OSError, ValueError) as exc:
            raise LogError(f"{self.path}: no answer from `cwlite serve` ({exc}); is it running on this data dir?") from exc
        if "error" in answer:
            raise LogError(f"{self.path}: cwlite serve refused: {answer['error']}")
        return list(answer.get("entries", []))


@contextlib.contextmanager
def client(data_dir: Path) -> Iterator[ControlClient]:
    """The control client for `data_dir`'s serving process; LogError when none serves there."""
    path = socket_path(data_dir)
    if not path.is_socket():
        raise LogError(f"{path}: no `cwlite serve` holds this host's measurement log (start `cwlite serve "
                       f"--data-dir {data_dir}` first: the log has one writer)")
    yield ControlClient(path)
