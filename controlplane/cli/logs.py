"""`--log-format json`: every line cwlite writes to stderr becomes one JSON object (journald, log shippers).

The daemons and commands write plain lines to stderr (`cwlite enforce: ...`,
`cwlite: error: ...`, uvicorn's warnings). Rather than a second logging path
beside them, stderr itself is wrapped: each complete line becomes
`{"ts", "level", "component", "msg", "pid"}`, so nothing anyone prints escapes
the format, and the text form stays byte for byte what it was.
"""
from __future__ import annotations

import io
import json
import os
import threading
import time
from typing import IO

FORMATS = ("text", "json")


def _level(line: str) -> str:
    if line.startswith(("cwlite: error:", "Traceback", "cwlite: aborted")):
        return "error"
    if "REFUSED" in line or "refused" in line or line.upper().startswith("WARNING"):
        return "warning"
    return "info"


class JsonLines(io.TextIOBase):
    """A text stream that writes each complete line to `target` as one JSON object (thread-safe)."""

    def __init__(self, target: IO[str]) -> None:
        self.target = target
        self._buf = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.target.fileno()

    def write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                self._emit(line)
        return len(s)

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        head, sep, _ = line.partition(": ")
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
                  "level": _level(line), "component": head if sep and head.startswith("cwlite") else "cwlite",
                  "msg": line, "pid": os.getpid()}
        self.target.write(json.dumps(record, sort_keys=True) + "\n")
        self.target.flush()

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                self._emit(self._buf)
                self._buf = ""
        self.target.flush()


def hoist(args: list[str]) -> list[str]:
    """`--log-format X` anywhere before a `--` moved to the front, where the group's option is parsed."""
    end = args.index("--") if "--" in args else len(args)
    for i, a in enumerate(args[:end]):
        if a == "--log-format" and i + 1 < end:
            return [a, args[i + 1], *args[:i], *args[i + 2:]]
        if a.startswith("--log-format="):
            return [a, *args[:i], *args[i + 1:]]
    return args


def requested_format(args: list[str]) -> str:
    """The --log-format given anywhere before a `--` (as --debug: the group's option), else "text"."""
    end = args.index("--") if "--" in args else len(args)
    for i, a in enumerate(args[:end]):
        if a == "--log-format" and i + 1 < end:
            return args[i + 1]
        if a.startswith("--log-format="):
            return a.split("=", 1)[1]
    return "text"
