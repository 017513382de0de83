"""Debian's distcc (3.4) as the build controller drives it: the host list, the compiler masquerade, the log.

distcc itself schedules the jobs; cwlite only decides which hosts it may use and
reads back who compiled what:
- Hosts: not DISTCC_HOSTS in the environment (make's children inherit it once, so
  a host could not be dropped mid-build) but `$DISTCC_DIR/hosts`, which every
  distcc invocation reads when it starts (distcc(1), "HOST SPECIFICATIONS"); the
  controller replaces that file atomically when the verified set changes.
- Masquerade: a directory first on make's PATH with `cc`, `gcc`, ... scripts that
  note `PID CWD` in the jobs file and then exec distcc with the same pid, so a
  log line's relative object name resolves to a file (recursive makes compile
  the same relative name in several directories).
- Attribution: DISTCC_LOG receives (checked on distcc 3.4+really3.4-3), per
  client pid: `distcc[PID] compile from SRC to OBJ`, then
  `distcc[PID] compile SRC on HOST:PORT/N completed ok` for a remote job, or
  `... on localhost completed ok` when it ran (or fell back) locally.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from controlplane.core.atomic import write_atomic

DISTCC = "/usr/bin/distcc"
COMPILERS = ("cc", "gcc", "c++", "g++", "gcc-12", "g++-12", "x86_64-linux-gnu-gcc", "x86_64-linux-gnu-gcc-12",
             "x86_64-linux-gnu-g++", "x86_64-linux-gnu-g++-12")
LOCAL = "localhost"

_FROM = re.compile(r"^distcc\[(\d+)\] compile from (.+) to (.+)$")
_DONE = re.compile(r"^distcc\[(\d+)\] compile (.+) on (\S+) completed ok$")

WRAPPER = """#!/bin/sh
# cwlite build: note this job's pid and directory, then become distcc (same pid)
printf '%s %s\\n' "$$" "$PWD" >> {jobs}
PATH={path} exec {distcc} {name} "$@"
"""


@dataclass(frozen=True)
class Job:
    """One compile job as distcc's client logged it: `host` is "ADDR:PORT" or "localhost"."""

    pid: int
    source: str
    output: Path
    host: str


class DistccRun:
    """The files of one build's distcc setup under `work`: hosts, masquerade, jobs file, log."""

    def __init__(self, work: Path) -> None:
        self.work = Path(work)
        self.dir = self.work / "distcc"          # DISTCC_DIR: its `hosts` file is the host list
        self.bin = self.work / "bin"
        self.jobs = self.work / "jobs"
        self.log = self.work / "distcc.log"
        self._log_pos = 0
        self._pending: dict[int, tuple[str, str]] = {}
        self._cwds: dict[int, str] = {}
        self.done: list[Job] = []

    def prepare(self, path: str) -> None:
        """Make the masquerade (scripts for each compiler name) and empty jobs/log files."""
        for d in (self.dir, self.bin):
            d.mkdir(parents=True, exist_ok=True)
        for name in COMPILERS:
            script = WRAPPER.format(jobs=shlex.quote(str(self.jobs)), path=shlex.quote(path), distcc=DISTCC,
                                    name=name)
            write_atomic(self.bin / name, script.encode(), mode=0o755)
        for f in (self.jobs, self.log):
            f.write_bytes(b"")
        self.write_hosts([])

    def write_hosts(self, specs: Iterable[str]) -> None:
        """Replace the host list (each `ADDR:PORT/JOBS`); empty: distcc compiles locally."""
        write_atomic(self.dir / "hosts", ("\n".join(specs) + "\n").encode(), mode=0o644)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """make's environment: the masquerade first on PATH, the host file, the client log, no fallback hiding."""
        env = {k: v for k, v in base.items() if k != "DISTCC_HOSTS"}
        env.update(PATH=f"{self.bin}:{base.get('PATH', os.defpath)}", DISTCC_DIR=str(self.dir),
                   DISTCC_LOG=str(self.log), DISTCC_VERBOSE="0")
        return env

    def collect(self) -> list[Job]:
        """Read what distcc logged since the last call; the jobs that completed since then."""
        for line in self.jobs.read_text().splitlines():
            pid, _, cwd = line.partition(" ")
            if pid.isdigit():
                self._cwds[int(pid)] = cwd
        with open(self.log, "rb") as f:
            f.seek(self._log_pos)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1           # a line still being written waits for the next call
        self._log_pos += end
        new = parse_log(chunk[:end].decode(errors="replace"), self._cwds, self._pending)
        self.done.extend(new)
        return new


def parse_log(text: str, cwds: dict[int, str], pending: dict[int, tuple[str, str]] | None = None) -> list[Job]:
    """Completed jobs in distcc client log text. `pending` carries `compile from` lines whose job has not
    completed yet between calls; `cwds` (pid -> directory) makes object names absolute."""
    pending = {} if pending is None else pending
    out = []
    for line in text.splitlines():
        m = _FROM.match(line)
        if m:
            pending[int(m[1])] = (m[2], m[3])
            continue
        m = _DONE.match(line)
        if m and int(m[1]) in pending:
            pid = int(m[1])
            source, obj = pending.pop(pid)
            host = LOCAL if m[3] == LOCAL else m[3].split("/", 1)[0]
            where = Path(obj) if os.path.isabs(obj) or pid not in cwds else Path(cwds[pid]) / obj
            out.append(Job(pid, source, Path(os.path.normpath(where)), host))
    return out
