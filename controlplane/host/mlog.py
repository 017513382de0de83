"""The live measurement log: integrity events written ahead of the PCR extend.

The format (the kernel's `ima-ng`) and the replay are controlplane.core.imalog;
this module owns the file a running cwlite appends to and the PCR it extends.

Write-ahead: an entry is appended and made durable (fdatasync) before it is
extended, so the PCR never holds an extend the log lacks. A commit thread
groups the fsyncs: everything appended since the previous fsync becomes
durable at once, then each of those entries is extended in order. On open the
log is replayed against the PCR: entries logged but not yet extended (a crash
between the two steps) are extended; a PCR that matches no prefix of the log
is refused (LogError naming the entry).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Sequence

from controlplane.core.atomic import fsync_dir, write_atomic
from controlplane.core.errors import LogError
from controlplane.core.events import Event, EventKind
from controlplane.core.imalog import (
    BOOT_AGGREGATE_PCRS,
    TEMPLATE,
    ZERO_PCR,
    LogEntry,
    boot_aggregate,
    parse_binary,
    replay,
    replay_to,
    scan_binary,
)

IMA_ASCII_LOG = Path("/sys/kernel/security/ima/ascii_runtime_measurements")
DEFAULT_PCR = 10
FALLBACK_PCR = 11
MAX_PENDING = 4096                              # appended-but-not-extended entries before record() waits


def kernel_ima_pcrs(ima_log: Path = IMA_ASCII_LOG) -> set[int]:
    """PCRs the kernel's own IMA measures into (empty when IMA has no log here)."""
    try:
        with open(ima_log, "r", errors="replace") as f:
            return {int(line.split(None, 1)[0]) for line in f if line.strip()}
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return set()
    except ValueError as exc:
        raise LogError(f"{ima_log}: unreadable PCR column ({exc})") from exc


def choose_pcr(preferred: int = DEFAULT_PCR, fallback: int = FALLBACK_PCR, *, ima_log: Path = IMA_ASCII_LOG) -> int:
    """`preferred` (10) unless the kernel's IMA measures there, then `fallback` (11): never share IMA's PCR."""
    used = kernel_ima_pcrs(ima_log)
    for pcr in (preferred, fallback):
        if pcr not in used:
            return pcr
    raise LogError(f"{ima_log}: the kernel's IMA measures into PCR {preferred} and {fallback}; configure a free PCR")


def log_pcr(path: Path) -> int | None:
    """The PCR the log at `path` was created for (its `.state` file), or None for a log not made yet."""
    state = Path(path).with_name(Path(path).name + ".state")
    try:
        return int(json.loads(state.read_text())["pcr"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise LogError(f"{state}: no PCR recorded ({exc})") from exc


class MeasurementLog:
    """An open measurement log bound to one PCR of one TPM (context manager; one writer per file).

    `record` appends the entry at once (ordered, visible in the file) and the
    commit thread makes it durable and then extends it; `flush` waits for that.
    `entries` lists the committed entries: those the PCR already holds.
    """

    def __init__(self, path: Path, tpm, pcr: int, fd: int, entries: list[LogEntry], recovered: int,
                 archived: Path | None, *, size: int) -> None:
        self.path = path
        self.tpm = tpm
        self.pcr = pcr
        self.recovered = recovered      # entries found logged-but-not-extended and extended at open
        self.archived = archived        # the previous boot's log, renamed aside at open
        self.torn_bytes = 0             # bytes of a torn, never-extended last append cut off at open
        self.extends = 0                # PCR extends made by this process (recovery at open included)
        self._fd = fd
        self._size = size                    # bytes of whole entries in the file (one writer: flock)
        self._committed = entries
        self._pending: list[LogEntry] = []
        self._cv = threading.Condition()
        self._extending = threading.Lock()   # held while a batch goes into the PCR
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._commit_loop, name=f"mlog-commit-{path.name}", daemon=True)
        self._thread.start()

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, tpm, *, pcr: int, ima_log: Path = IMA_ASCII_LOG) -> "MeasurementLog":
        """Open (or create) the log at `path` for `pcr`, recovering or refusing as the PCR demands.

        A PCR the kernel's own IMA measures into is refused: two writers make
        both logs unverifiable (`choose_pcr` picks a free one).
        """
        path = Path(path)
        if pcr in kernel_ima_pcrs(ima_log):
            raise LogError(f"{path}: PCR {pcr}: the kernel's IMA measures into it ({ima_log}); "
                           f"use another PCR (cwlite's choice here: {choose_pcr(ima_log=ima_log)})")
        state_path = path.with_name(path.name + ".state")
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        log = None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise LogError(f"{path}: another cwlite process has this measurement log open") from exc
                raise
            clock = tpm.clock_info()
            archived = cls._archive_previous_boot(path, state_path, fd, clock.reset_count)
            if archived is not None:
                os.close(fd)
                log = cls.open(path, tpm, pcr=pcr)
                log.archived = archived
                return log
            data = _read_all(fd)
            scan = scan_binary(data, source=str(path))
            entries, good_end = scan.entries, scan.end
            current = tpm.read_pcr(pcr)
            if scan.error is not None:
                # A torn last append (power loss mid-write) was never fsynced, so never
                # extended: when the PCR is exactly the replay of the whole entries before
                # it, cut it off. Any other damage, or a PCR that disagrees, is refused.
                if not (scan.torn and replay(entries, pcr) == current):
                    raise scan.error
                os.ftruncate(fd, good_end)
                os.fsync(fd)
                torn_bytes = len(data) - good_end
            else:
                torn_bytes = 0
            if not entries:
                if current != ZERO_PCR:
                    raise LogError(f"{path}: entry 0: the log is empty but PCR {pcr} is not at its reset value "
                                   f"({current.hex()[:16]}...): another writer, or this boot's log was lost", entry=0)
                write_atomic(state_path, json.dumps({"pcr": pcr, "reset_count": clock.reset_count, "bank": "sha256",
                                                     "template": TEMPLATE}, sort_keys=True).encode(), mode=0o644)
                log = cls(path, tpm, pcr, fd, [], 0, None, size=0)
                pcrs = tpm.read_pcrs(BOOT_AGGREGATE_PCRS)
                log.record(Event(EventKind.BOOT_AGGREGATE, boot_aggregate(pcrs)), wait=True)
                return log
            recovered = cls._recover(path, tpm, pcr, entries, current)
            log = cls(path, tpm, pcr, fd, entries, recovered, None, size=good_end)
            log.torn_bytes = torn_bytes
            log.extends = recovered
            return log
        except BaseException:
            if log is not None:
                log.close()        # stops its commit thread, closes fd
            else:
                os.close(fd)
            raise

    @staticmethod
    def _archive_previous_boot(path: Path, state_path: Path, fd: int, reset_count: int) -> Path | None:
        """A log from before the last TPM reset (reboot, swtpm restart) is renamed aside: PCRs start over."""
        try:
            state = json.loads(state_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise LogError(f"{state_path}: not JSON ({exc})") from exc
        if state.get("reset_count") == reset_count or os.fstat(fd).st_size == 0:
            return None
        aside = path.with_name(f"{path.name}.reset{state.get('reset_count')}")
        os.replace(path, aside)
        os.replace(state_path, aside.with_name(aside.name + ".state"))
        fsync_dir(path.parent)
        return aside

    @staticmethod
    def _recover(path: Path, tpm, pcr: int, entries: list[LogEntry], current: bytes) -> int:
        """Match the PCR to the longest log prefix; extend the rest (logged, not yet extended)."""
        for e in entries:
            if e.pcr != pcr:
                raise LogError(f"{path}: entry {e.index}: is for PCR {e.pcr}, the log is opened for PCR {pcr}",
                               entry=e.index)
        k = replay_to(entries, ZERO_PCR, current, pcr)
        if k is None:
            n = len(entries)
            raise LogError(f"{path}: entry {n}: PCR {pcr} ({current.hex()[:16]}...) matches no prefix of the "
                           f"{n}-entry log: entries are missing or corrupted, or another process extended "
                           f"PCR {pcr}", entry=n)
        for e in entries[k:]:
            tpm.extend(pcr, e.pcr_digest)
        return len(entries) - k

    # -- writing -------------------------------------------------------------------------------
    def record(self, event: Event, *, wait: bool = False) -> LogEntry:
        """Append `event` as the next entry; it is fsynced and then extended by the commit thread.

        `wait=True` returns only once the PCR holds it. Raises LogError once a
        commit failed (the log stays consistent: the next open recovers it).
        """
        with self._cv:
            self._check()
            while len(self._pending) >= MAX_PENDING:
                self._cv.wait()
                self._check()
            index = len(self._committed) + len(self._pending)
            entry = LogEntry.new(index, self.pcr, event.digest, event.ima_name())
            data = entry.binary()
            try:
                _write_all(self._fd, data)
            except OSError as exc:   # e.g. ENOSPC after a partial write: never leave half an entry
                try:
                    os.ftruncate(self._fd, self._size)
                finally:
                    self._error = exc
                    self._cv.notify_all()
                raise LogError(f"{self.path}: entry {index}: cannot append ({exc.strerror}); "
                               "nothing more is recorded", entry=index) from exc
            self._size += len(data)
            self._pending.append(entry)
            self._cv.notify_all()
        if wait:
            self._wait_committed(index + 1)
        return entry

    def flush(self) -> None:
        """Wait until every recorded entry is durable and extended."""
        with self._cv:
            target = len(self._committed) + len(self._pending)
        self._wait_committed(target)

    def _wait_committed(self, count: int) -> None:
        """Wait until `count` entries are in the PCR (a closing log still commits what it has)."""
        with self._cv:
            while len(self._committed) < count:
                if self._error is not None:
                    self._check()
                self._cv.wait()

    def _check(self) -> None:
        if self._error is not None:
            raise LogError(f"{self.path}: commit failed, nothing more is recorded until a restart recovers "
                           f"the log: {self._error}", entry=len(self._committed)) from self._error
        if self._closing:
            raise LogError(f"{self.path}: closed")

    def make_durable(self, batch: Sequence[LogEntry]) -> None:
        """The write-ahead step of one commit: `batch` (and all appended before it) reaches the disk
        with one fdatasync; only then are its entries extended. The commit thread calls it."""
        os.fdatasync(self._fd)

    def _commit_loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
            with self._extending:
                done = 0
                try:
                    self.make_durable(batch)   # write-ahead: the whole batch is durable before any extend
                    for e in batch:
                        self.tpm.extend(self.pcr, e.pcr_digest)
                        done += 1
                        self.extends += 1
                except BaseException as exc:   # noqa: BLE001 - handed to the producers, who raise it
                    with self._cv:
                        del self._pending[:done]
                        self._committed.extend(batch[:done])
                        self._error = exc
                        self._cv.notify_all()
                    return
                with self._cv:
                    del self._pending[: len(batch)]
                    self._committed.extend(batch)
                    self._cv.notify_all()

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """How many entries are committed (the PCR holds them)."""
        with self._cv:
            return len(self._committed)

    def entries(self, start: int = 0) -> list[LogEntry]:
        """The committed entries from `start` (the PCR holds exactly these)."""
        with self._cv:
            return list(self._committed[start:])

    def quote(self, qualifying_data: bytes, pcrs: Sequence[int] = ()):
        """A TPM quote and the log entries it covers, taken together so they agree exactly.

        Returns (Quote, entries). `pcrs` defaults to the log's PCR alone.
        """
        self.flush()
        with self._extending:   # no commit can extend between the quote and the entry list
            q = self.tpm.quote(qualifying_data, list(pcrs) or [self.pcr])
            return q, self.entries()

    def close(self) -> None:
        """Commit what is pending, stop the commit thread, release the file."""
        with self._cv:
            if self._fd < 0:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        with self._cv:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "MeasurementLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_all(fd: int) -> bytes:
    chunks, off = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, off)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        off += len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_log(path: Path) -> list[LogEntry]:
    """Parse a log file (binary form) without opening it for writing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise LogError(f"{path}: no such measurement log") from exc
    return parse_binary(data, source=str(path))
