"""The measurement log: integrity events in the kernel's `ima-ng` form, written ahead of the PCR extend.

On-disk form: exactly the bytes the kernel's
/sys/kernel/security/ima/binary_runtime_measurements holds (little-endian, as
on x86), one entry after the other; `to_ascii` gives the lines of
ascii_runtime_measurements. So tools that read IMA logs read cwlite's; and cwlite's parsers read the
kernel's own logs, in `ima-ng` and in `ima-sig` (Debian's default template:
ima-ng plus the file's signature field).

One entry (security/integrity/ima/ima_fs.c `ima_measurements_show`):

    u32 pcr | 20-byte template hash (SHA-1 of the template data) |
    u32 len, "ima-ng" | u32 len, template data

and the ima-ng template data (ima_template_lib.c) is two fields, each
`u32 len, bytes`: d-ng = b"sha256:" NUL digest, n-ng = the name and a NUL.
The kernel replaces spaces in names by "_" (ima_write_template_field_data);
so does cwlite (and newlines and NULs, which would break the ASCII form).
In the sha256 PCR bank the kernel extends SHA-256 of the template data; a
violation entry (template hash all zero) extends 32 bytes of 0xff.

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
import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from controlplane.core.atomic import fsync_dir, write_atomic
from controlplane.core.errors import LogError
from controlplane.core.events import Event, EventKind

TEMPLATE = "ima-ng"                              # what cwlite writes
TEMPLATE_FIELDS = {"ima-ng": 2, "ima-sig": 3}   # what it reads: ima-sig = ima-ng + a signature (kernel logs)
SHA1_SIZE = 20
SHA256_SIZE = 32
ZERO_PCR = bytes(SHA256_SIZE)
VIOLATION_EXTEND = b"\xff" * SHA256_SIZE
BOOT_AGGREGATE_PCRS = tuple(range(10))        # sha256 bank: PCRs 0-9 (ima_calc_boot_aggregate_tfm)
IMA_ASCII_LOG = Path("/sys/kernel/security/ima/ascii_runtime_measurements")
DEFAULT_PCR = 10
FALLBACK_PCR = 11
MAX_PENDING = 4096                              # appended-but-not-extended entries before record() waits
FAULT_ENV = "CWLITE_FAULT"                      # tests only: "after-log-before-extend[:N]"
FAULT_EXIT = 86
_NAME_FIXES = str.maketrans({" ": "_", "\n": "_", "\0": "_"})
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<I20sI")                 # pcr, template hash, template name length
_DIGEST_ALGS = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "md5": 16, "sm3": 32}


# ---------------------------------------------------------------------------------------------
# One entry, its two forms, and the parsers.

class _computed_once:
    """A lock-free cached property. functools.cached_property takes a lock on each first access
    (Python 3.11), which was a sixth of a 100,000-entry verifier check; entries are immutable, so a
    race only computes the same bytes twice."""

    def __init__(self, func) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


@dataclass(frozen=True, kw_only=True)
class LogEntry:
    """One ima-ng entry. `template_hash` is the SHA-1 the kernel logs; `pcr_digest` is what the sha256 bank extends."""

    index: int
    pcr: int
    template_hash: bytes
    template_name: str = TEMPLATE
    digest: bytes
    name: str
    digest_alg: str = "sha256"
    signature: bytes = b""          # ima-sig only: the file's IMA signature (often empty)

    @classmethod
    def new(cls, index: int, pcr: int, digest: bytes, name: str, digest_alg: str = "sha256") -> "LogEntry":
        """An entry for (digest, name), with the name made kernel-safe and the template hash computed."""
        name = name.translate(_NAME_FIXES)
        data = _template_data(digest_alg, digest, name)
        entry = cls(index=index, pcr=pcr, template_hash=hashlib.sha1(data).digest(), digest=digest,
                    name=name, digest_alg=digest_alg)
        entry.__dict__["template_data"] = data   # seed the cached_property: built once per entry
        return entry

    @_computed_once
    def template_data(self) -> bytes:
        return _template_data(self.digest_alg, self.digest, self.name, self.template_name, self.signature)

    @property
    def is_violation(self) -> bool:
        """A kernel IMA violation entry: logged with a zero template hash, extended with 0xff bytes."""
        return self.template_hash == bytes(SHA1_SIZE)

    @_computed_once
    def pcr_digest(self) -> bytes:
        """The value extended into the sha256 PCR bank for this entry."""
        return VIOLATION_EXTEND if self.is_violation else hashlib.sha256(self.template_data).digest()

    def binary(self) -> bytes:
        """The entry exactly as binary_runtime_measurements holds it."""
        data = self.template_data
        tname = self.template_name.encode()
        return b"".join((_HEAD.pack(self.pcr, self.template_hash, len(tname)), tname, _U32.pack(len(data)), data))

    def ascii(self) -> str:
        """The entry's line in ascii_runtime_measurements (without the newline)."""
        line = (f"{self.pcr:2d} {self.template_hash.hex()} {self.template_name} "
                f"{self.digest_alg}:{self.digest.hex()} {self.name}")
        return line + f" {self.signature.hex()}" if self.template_name == "ima-sig" else line

    def event(self) -> Event | None:
        """The cwlite Event this entry records (None for an entry cwlite did not write)."""
        from controlplane.core.events import parse_ima_name

        return parse_ima_name(self.digest, self.name)

    def to_dict(self) -> dict:
        return {"index": self.index, "pcr": self.pcr, "template_hash": self.template_hash.hex(),
                "template_name": self.template_name, "digest": f"{self.digest_alg}:{self.digest.hex()}",
                "name": self.name, **({"signature": self.signature.hex()} if self.template_name == "ima-sig" else {})}


def _template_data(digest_alg: str, digest: bytes, name: str, template: str = TEMPLATE,
                   signature: bytes = b"") -> bytes:
    d_ng = digest_alg.encode() + b":\0" + digest
    n_ng = name.encode("utf-8", "surrogateescape") + b"\0"
    data = _U32.pack(len(d_ng)) + d_ng + _U32.pack(len(n_ng)) + n_ng
    return data + _U32.pack(len(signature)) + signature if template == "ima-sig" else data


def _fail(source: str, index: int, what: str) -> LogError:
    return LogError(f"{source}: entry {index}: {what}", entry=index)


def _check_digest(source: str, index: int, alg: str, digest: bytes) -> None:
    want = _DIGEST_ALGS.get(alg)
    if want is None:
        raise _fail(source, index, f"d-ng: unknown digest algorithm {alg!r}")
    if len(digest) != want:
        raise _fail(source, index, f"d-ng: {alg} digest is {len(digest)} bytes, want {want}")


def _check_hash(source: str, entry: LogEntry) -> LogEntry:
    if not entry.is_violation and hashlib.sha1(entry.template_data).digest() != entry.template_hash:
        raise _fail(source, entry.index, "template hash does not match the template data (entry corrupted)")
    return entry


class _Torn(Exception):
    """The data ends inside an entry (as after a crash in the middle of an append)."""


def _one_binary(view: memoryview, off: int, n: int, source: str) -> tuple[LogEntry, int]:
    """The entry at `off` and the offset after it. Raises _Torn (data ends early) or LogError (bad data)."""
    size = len(view)
    if size - off < _HEAD.size:
        raise _Torn(f"truncated header ({size - off} of {_HEAD.size} bytes at offset {off})")
    pcr, thash, tname_len = _HEAD.unpack_from(view, off)
    off += _HEAD.size
    if tname_len == 0 or tname_len > 255:
        raise _fail(source, n, f"template name length {tname_len} at offset {off - 4} (corrupted)")
    if off + tname_len + 4 > size:
        raise _Torn(f"truncated template name at offset {off}")
    tname = bytes(view[off: off + tname_len]).decode("ascii", "replace")
    off += tname_len
    (dlen,) = _U32.unpack_from(view, off)
    off += 4
    if tname not in TEMPLATE_FIELDS:
        raise _fail(source, n, f"template {tname!r} (reads {', '.join(TEMPLATE_FIELDS)})")
    if off + dlen > size:
        raise _Torn(f"truncated template data ({size - off} of {dlen} bytes)")
    if pcr >= 24:
        raise _fail(source, n, f"PCR {pcr} out of range")
    fields, foff, end = [], off, off + dlen
    while foff < end:
        if foff + 4 > end:
            raise _fail(source, n, "template data: truncated field length")
        (flen,) = _U32.unpack_from(view, foff)
        foff += 4
        if foff + flen > end:
            raise _fail(source, n, f"template data: field {len(fields)} overruns the entry")
        fields.append(bytes(view[foff: foff + flen]))
        foff += flen
    if len(fields) != TEMPLATE_FIELDS[tname]:
        raise _fail(source, n, f"{tname} has {TEMPLATE_FIELDS[tname]} fields, entry has {len(fields)}")
    d_ng, n_ng = fields[:2]
    sep = d_ng.find(b":\0")
    if sep <= 0:
        raise _fail(source, n, "d-ng: no '<alg>:' prefix")
    if not n_ng.endswith(b"\0") or b"\0" in n_ng[:-1]:
        raise _fail(source, n, "n-ng: not one NUL-terminated string")
    alg, digest = d_ng[:sep].decode("ascii", "replace"), d_ng[sep + 2:]
    _check_digest(source, n, alg, digest)
    entry = _check_hash(source, LogEntry(index=n, pcr=pcr, template_hash=thash, template_name=tname, digest=digest,
                                         name=n_ng[:-1].decode("utf-8", "surrogateescape"), digest_alg=alg,
                                         signature=fields[2] if tname == "ima-sig" else b""))
    return entry, end


def _scan_binary(data: bytes, source: str, start_index: int = 0) -> tuple[list[LogEntry], int, LogError | None, bool]:
    """(entries before the first bad one, where they end, the error or None, whether the data just ends early)."""
    entries: list[LogEntry] = []
    off, n, view = 0, start_index, memoryview(data)
    try:
        while off < len(data):
            entry, off_next = _one_binary(view, off, n, source)
            entries.append(entry)
            off, n = off_next, n + 1
    except _Torn as torn:
        return entries, off, _fail(source, n, str(torn)), True
    except LogError as err:
        return entries, off, err, False
    return entries, off, None, False


def parse_binary(data: bytes, *, source: str = "log", start_index: int = 0) -> list[LogEntry]:
    """Entries of a binary_runtime_measurements-format buffer; a malformed entry raises LogError(entry=n)."""
    entries, _, err, _ = _scan_binary(data, source, start_index)
    if err is not None:
        raise err
    return entries


def parse_ascii(text: str, *, source: str = "log") -> list[LogEntry]:
    """Entries of ascii_runtime_measurements text; a malformed line raises LogError(entry=n)."""
    entries: list[LogEntry] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines):
        parts = line.lstrip(" ").split(" ", 4)
        if len(parts) != 5:
            raise _fail(source, n, f"{len(parts)} fields, ima-ng lines have 5")
        pcr_s, thash_s, tname, dng, name = parts
        if tname not in TEMPLATE_FIELDS:
            raise _fail(source, n, f"template {tname!r} (reads {', '.join(TEMPLATE_FIELDS)})")
        sig_hex = ""
        if tname == "ima-sig":   # names hold no spaces in kernel logs: the signature is the last word
            name, space, sig_hex = name.rpartition(" ")
            if not space:
                raise _fail(source, n, "ima-sig line without its signature field")
        alg, _, dhex = dng.partition(":")
        try:
            pcr = int(pcr_s)
            thash = bytes.fromhex(thash_s)
            digest = bytes.fromhex(dhex)
            signature = bytes.fromhex(sig_hex)
        except ValueError as exc:
            raise _fail(source, n, f"not a number/hex field ({exc})") from exc
        if not 0 <= pcr < 24 or len(thash) != SHA1_SIZE:
            raise _fail(source, n, f"PCR {pcr_s!r} or template hash {thash_s!r} malformed")
        _check_digest(source, n, alg, digest)
        entries.append(_check_hash(source, LogEntry(index=n, pcr=pcr, template_hash=thash, template_name=tname,
                                                    digest=digest, name=name, digest_alg=alg, signature=signature)))
    return entries


def to_binary(entries: Iterable[LogEntry]) -> bytes:
    return b"".join(e.binary() for e in entries)


def to_ascii(entries: Iterable[LogEntry]) -> str:
    return "".join(e.ascii() + "\n" for e in entries)


def replay_prefixes(entries: Sequence[LogEntry], pcr: int) -> list[bytes]:
    """PCR values after 0, 1, ..., len(entries) entries (entries for other PCRs leave it unchanged)."""
    value = ZERO_PCR
    out = [value]
    for e in entries:
        if e.pcr == pcr:
            value = hashlib.sha256(value + e.pcr_digest).digest()
        out.append(value)
    return out


def replay(entries: Sequence[LogEntry], pcr: int) -> bytes:
    """The sha256-bank value `pcr` holds after extending every entry for it, from reset."""
    return replay_prefixes(entries, pcr)[-1]


def boot_aggregate(pcr_values: Mapping[int, bytes]) -> bytes:
    """The kernel's sha256 boot_aggregate: SHA-256 over PCRs 0-9 of the sha256 bank, in order."""
    return hashlib.sha256(b"".join(pcr_values[i] for i in BOOT_AGGREGATE_PCRS)).digest()


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


# ---------------------------------------------------------------------------------------------
# The live log: write-ahead, group commit, recovery.

def _fault_point() -> int | None:
    """Tests only: CWLITE_FAULT=after-log-before-extend[:N] exits the process after the
    fsync and before the extend of the commit that holds entry N (default: any)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith("after-log-before-extend"):
        return None
    _, _, n = spec.partition(":")
    return int(n) if n else 0


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
        self._fd = fd
        self._size = size                    # bytes of whole entries in the file (one writer: flock)
        self._committed = entries
        self._pending: list[LogEntry] = []
        self._cv = threading.Condition()
        self._extending = threading.Lock()   # held while a batch goes into the PCR
        self._error: BaseException | None = None
        self._closing = False
        self._fault = _fault_point()
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
            entries, good_end, err, torn = _scan_binary(data, str(path))
            current = tpm.read_pcr(pcr)
            if err is not None:
                # A torn last append (power loss mid-write) was never fsynced, so never
                # extended: when the PCR is exactly the replay of the whole entries before
                # it, cut it off. Any other damage, or a PCR that disagrees, is refused.
                if not (torn and replay(entries, pcr) == current):
                    raise err
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
        prefixes = replay_prefixes(entries, pcr)
        matches = [k for k, v in enumerate(prefixes) if v == current]
        if not matches:
            n = len(entries)
            raise LogError(f"{path}: entry {n}: PCR {pcr} ({current.hex()[:16]}...) matches no prefix of the "
                           f"{n}-entry log: entries are missing or corrupted, or another process extended "
                           f"PCR {pcr}", entry=n)
        k = matches[-1]
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
                    os.fdatasync(self._fd)   # write-ahead: the whole batch is durable before any extend
                    if self._fault is not None and batch[-1].index >= self._fault:
                        os._exit(FAULT_EXIT)
                    for e in batch:
                        self.tpm.extend(self.pcr, e.pcr_digest)
                        done += 1
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
