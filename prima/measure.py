"""Which files are code, and their measurements (SHA-256), as fast as the disk and both cores allow.

Code is what the kernel can run or map: ELF executables and shared objects
(recognised by the ELF header, never by mode bits) and scripts whose `#!`
line names an interpreter (so the interpreter can be policy-checked too).

Measuring is bound by SHA-256 and I/O: files are read in 1 MiB blocks and
hashed on a thread pool sized to the cores (hashlib releases the GIL on large
buffers).

A measurement is `stable` when nothing could change the bytes while they were
read: the file was open for write by nobody (a read lease, F_SETLEASE F_RDLCK,
is refused while any descriptor or shared writable mapping holds write access,
and is broken by any open for write during the read), and its ctime is older
than two clock ticks (the kernel stamps ctime from a coarse clock, so a write
within the same tick as the last change would leave it unchanged; a younger
file is read again once that has passed). Only stable measurements go to the
cache, and the cache is used only where a later write must change the ctime
(the caller's rule: prima.measuredb).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import signal
import stat
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from controlplane.core.errors import MeasureDBError

BLOCK = 1 << 20
ELF_MAGIC = b"\x7fELF"
ET_EXEC, ET_DYN = 2, 3
# The kernel reads at most this much of a #! line (BINPRM_BUF_SIZE).
SHEBANG_MAX = 256
# A ctime younger than this may be shared by a write still to come (coarse clock: 1-10 ms ticks).
RACY_NS = 50_000_000


@dataclass(frozen=True)
class FileKind:
    """What kind of code a file is: "elf", or "script" with its #! interpreter line."""

    kind: str
    interpreter: str = ""


def classify(head: bytes) -> FileKind | None:
    """The FileKind of a file starting with `head`, or None when it is not code."""
    if head[:4] == ELF_MAGIC and len(head) >= 18:
        order = {1: "<", 2: ">"}.get(head[5])
        if order is None:
            return None
        (e_type,) = struct.unpack_from(order + "H", head, 16)
        return FileKind("elf") if e_type in (ET_EXEC, ET_DYN) else None
    if head[:2] == b"#!":
        line = head[2:SHEBANG_MAX].split(b"\n", 1)[0].strip()
        if line.startswith(b"/"):
            return FileKind("script", line.decode("utf-8", "replace"))
    return None


@dataclass(frozen=True)
class Identity:
    """A file's identity and change cookie as stat() reports them (userspace st_dev encoding)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Identity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Measured:
    """One file's measurement. `kind` None = not code (then no digest is computed)."""

    path: str
    ident: Identity
    kind: FileKind | None
    sha256: bytes | None = None
    md5: bytes | None = None
    reused: bool = False  # taken from the cache, not read now
    stable: bool = True   # nobody could write it while it was read (see the module docstring)


_buffers = threading.local()


def _buffer() -> memoryview:
    """This thread's read buffer (one per thread: reads and hashing run unlocked)."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(bytearray(BLOCK))
    return buf


def hash_reader(read_into: Callable[[memoryview], int], *, md5: bool = False, only_code: bool = True) -> tuple[FileKind | None, bytes | None, bytes | None]:
    """Classify from the first block, then SHA-256 (and MD5 when asked) everything `read_into` yields.

    Returns (kind, sha256, md5); with `only_code`, a file that is not code is
    not read past its first block and has no digest.
    """
    buf = _buffer()
    n = read_into(buf)
    kind = classify(bytes(buf[: min(n, SHEBANG_MAX)]))
    if kind is None and only_code:
        return None, None, None
    sha = hashlib.sha256()
    m5 = hashlib.md5() if md5 else None
    while n:
        sha.update(buf[:n])
        if m5 is not None:
            m5.update(buf[:n])
        n = read_into(buf)
    return kind, sha.digest(), (m5.digest() if m5 is not None else None)


def _read_lease(fd: int) -> bool | None:
    """Take a read lease on `fd`: True when taken (nobody has the file open for write; a shared
    writable mapping holds its file open), False when refused for a writer (EAGAIN), None where
    this file system or caller gets no leases (9p, NFS: EINVAL; not the owner: EACCES)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)  # a lease break would otherwise send SIGIO: fatal
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return False if exc.errno == errno.EAGAIN else None
    return True


def _lease_held(fd: int, leased: bool | None) -> bool:
    """After reading: False when the lease was refused or broken (an open for write meanwhile)."""
    if leased is None:
        return True  # no lease here: the kernel's trust-time writer check is all there is
    if not leased:
        return False
    try:
        held = fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        return False
    return held


def has_writers(path: str | os.PathLike[str]) -> bool:
    """True when `path` is open for write (or mapped shared-writable) now, or that cannot be told."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        return not _lease_held(fd, _read_lease(fd))
    finally:
        os.close(fd)


def measure_file(path: str | os.PathLike[str], *, md5: bool = False, only_code: bool = True) -> Measured | None:
    """Classify and hash one regular file; None when it is not a regular file (symlink, device, gone).

    The identity is taken from the open descriptor before and after reading:
    a file that changed while being read is read again (once), then refused.
    A file changed less than RACY_NS ago is read again after that has passed.
    """
    p = os.fspath(path)
    for _attempt in range(3):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink, a socket
                return None
            raise MeasureDBError(f"{p}: cannot open: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            before = Identity.of(st)
            leased = _read_lease(fd)
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                kind, sha, m5 = hash_reader(f.readinto, md5=md5, only_code=only_code)
            if kind is None and only_code:
                return Measured(p, before, None)
            stable = _lease_held(fd, leased)
            if Identity.of(os.fstat(fd)) == before:
                young = before.ctime_ns + RACY_NS - time.time_ns()
                if young <= 0 or _attempt == 2:
                    return Measured(p, before, kind, sha, m5, stable=stable and young <= 0)
                time.sleep(young / 1e9)
        except OSError as exc:
            raise MeasureDBError(f"{p}: cannot read: {exc.strerror}") from exc
        finally:
            os.close(fd)
    raise MeasureDBError(f"{p}: changed while being measured (twice); measure it again when it is stable")


def unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, the superblock's device (st_dev encoding), type, super options."""

    point: str
    dev: int
    fstype: str
    options: Mapping[str, str]

    def layer_dirs(self) -> list[str]:
        """An overlayfs mount's layer directories, topmost first (upperdir, then each lowerdir); else []."""
        if self.fstype != "overlay":
            return []
        dirs = [self.options["upperdir"]] if self.options.get("upperdir") else []
        dirs += [x for x in re.split(r"(?<!\\):", self.options.get("lowerdir", "")) if x]
        return [unescape_mountinfo(d).replace("\\:", ":").replace("\\,", ",") for d in dirs]

    def hides(self, layer: str) -> bool:
        """True when overlay layer directory `layer` is at or under this mount's own point (virtme-ng mounts
        `lowerdir=/usr` on /usr): its path now leads into the overlay, so the layer's own files cannot be
        reached by any path, and nothing can measure them."""
        real = os.path.realpath(layer)
        return real == self.point or real.startswith(self.point.rstrip("/") + "/")


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    out: list[Mount] = []
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) < 5 or len(r) < 3:
            continue
        major, minor = (int(x) for x in f[2].split(":"))
        opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in re.split(r"(?<!\\),", r[2]))
        out.append(Mount(unescape_mountinfo(f[4]), os.makedev(major, minor), r[0], opts))
    return out


# File systems whose ctime changes with every change of content once nobody holds the
# file open for write: write(2) stamps it (file_modified), and the first write to a
# page through a shared mapping faults into ->page_mkwrite, which stamps it
# (ext4_page_mkwrite, btrfs_page_mkwrite, xfs_write_fault: file_update_time). tmpfs
# has no page_mkwrite (mapped pages are written with no stamp) and overlayfs passes
# mappings to whatever its layers are: their files are always read again.
CTIME_WITNESS_FS = frozenset({"ext4", "btrfs", "xfs"})


def ctime_witness_devs() -> set[int]:
    """st_dev of every mounted file system in CTIME_WITNESS_FS: where an unchanged stat means unchanged bytes
    (for a file measured with no writer)."""
    return {m.dev for m in mounts() if m.fstype in CTIME_WITNESS_FS}


def walk(root: str | os.PathLike[str]) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file under `root` (symlinks are not followed), with its lstat()."""
    stack = [os.fspath(root)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise MeasureDBError(f"{d}: cannot list: {exc.strerror}") from exc
        with it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    yield e.path, e.stat(follow_symlinks=False)


Cache = Callable[[os.stat_result], Measured | None]  # stat() -> the measurement of that same file state


def measure_many(
    paths: Iterable[tuple[str, os.stat_result | None]],
    *,
    cache: Cache | None = None,
    md5: bool = False,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Measured]:
    """Measure many files on a thread pool, reusing `cache` hits (marked `reused`).

    `paths` pairs a path with its lstat() when the caller already has it (a
    directory walk does). Cache hits are answered first, without touching
    the pool; then the rest as the pool finishes them (input order among
    them). Files that are not regular (or vanished) are skipped.
    """
    misses: list[str] = []
    for path, st in paths:
        if st is None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
        if not stat.S_ISREG(st.st_mode):
            continue
        hit = cache(st) if cache is not None else None
        if hit is not None and (hit.kind is None or not md5 or hit.md5 is not None):
            if progress is not None:
                progress(1)
            yield Measured(path, hit.ident, hit.kind, hit.sha256, hit.md5, True)
        else:
            misses.append(path)
    if not misses:
        return
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2, thread_name_prefix="measure") as pool:
        for m in pool.map(lambda p: measure_file(p, md5=md5), misses):
            if progress is not None:
                progress(1)
            if m is not None:
                yield m


def check_dirs(dirs: Sequence[str | os.PathLike[str]], what: str) -> list[Path]:
    """Absolute paths of `dirs`, refusing (one line) one that is not a directory."""
    out = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise MeasureDBError(f"{p}: {what}: no such directory")
        out.append(p.resolve())
    return out


# ---- the file a violation named ------------------------------------------------------------
EVIDENCE_MAX_BYTES = 256 << 20     # a violation's file is hashed only up to this size...
EVIDENCE_TIMEOUT_S = 2.0           # ...and for this long: the enforce loop must keep reading the ring buffer
EVIDENCE_MAX_FDS = 4096            # descriptors of the process looked at for the file


def _evidence_candidates(pid: int, name: str) -> Iterator[str]:
    """Where the file a process exec'd or mapped can still be opened, most direct first: its executable,
    its open descriptors (a mapping's fd), then the path it named (relative to its cwd)."""
    proc = f"/proc/{pid}" if pid > 0 else ""
    if proc:
        yield f"{proc}/exe"
        try:
            with os.scandir(f"{proc}/fd") as it:
                for i, fd in enumerate(it):
                    if i >= EVIDENCE_MAX_FDS:
                        break
                    yield fd.path
        except OSError:
            pass
    if name.startswith("/"):
        yield name
    elif name and proc:
        yield f"{proc}/cwd/{name}"


def _unchanged_since(st: os.stat_result, ctime_ns: int) -> bool:
    """The content is the one the kernel judged at change cookie `ctime_ns`: the same ctime, or a file since
    unlinked (which moves its ctime; "run it, then delete it" must not hide what ran) not written after it.
    (A root attacker holding the deleted file open can still write it and reset its mtime: the digest is
    evidence for the operator; the entry is untrusted whatever it says.)"""
    if not ctime_ns or st.st_ctime_ns == ctime_ns:
        return True
    return st.st_nlink == 0 and st.st_mtime_ns <= ctime_ns


def measure_evidence(pid: int, dev: int, ino: int, ctime_ns: int, name: str, *, kernel_dev: Callable[[int], int],
                     max_bytes: int = EVIDENCE_MAX_BYTES, timeout_s: float = EVIDENCE_TIMEOUT_S) -> bytes | None:
    """SHA-256 of the very file (kernel `dev`, `ino`, unchanged since `ctime_ns`) a violation by `pid` named,
    or None when no such file can be opened any more (gone, replaced, changed, too large, too slow).

    Opened through the process (/proc/PID/exe, /proc/PID/fd/N) before the path it named, and taken only
    when the opened file's identity is the kernel's: a path re-pointed after the event is not measured
    in its place. `kernel_dev` maps stat()'s st_dev to the kernel's dev_t encoding.
    """
    deadline = time.monotonic() + timeout_s
    for candidate in _evidence_candidates(pid, name):
        if time.monotonic() > deadline:
            return None
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_ino != ino or kernel_dev(st.st_dev) != dev
                    or not _unchanged_since(st, ctime_ns) or st.st_size > max_bytes):
                continue
            sha = hashlib.sha256()
            buf = _buffer()
            while n := os.readv(fd, [buf]):
                sha.update(buf[:n])
                if time.monotonic() > deadline:
                    return None
            if os.fstat(fd).st_ctime_ns != st.st_ctime_ns:
                return None          # written while being read: not the bytes the kernel judged
            return sha.digest()
        except OSError:
            continue
        finally:
            os.close(fd)
    return None
