"""Which files are code, and their measurements (SHA-256), as fast as the disk and both cores allow.

Code is what the kernel can run or map: ELF executables and shared objects
(recognised by the ELF header, never by mode bits) and scripts whose `#!`
line names an interpreter (so the interpreter can be policy-checked too).

Measuring is bound by SHA-256 and I/O: files are read in 1 MiB blocks and
hashed on a thread pool sized to the cores (hashlib releases the GIL on large
buffers). A file whose (dev, ino, size, mtime, ctime) is unchanged since it
was last measured is not read again (the cache key).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from controlplane.core.errors import MeasureDBError

BLOCK = 1 << 20
ELF_MAGIC = b"\x7fELF"
ET_EXEC, ET_DYN = 2, 3
# The kernel reads at most this much of a #! line (BINPRM_BUF_SIZE).
SHEBANG_MAX = 256


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


def measure_file(path: str | os.PathLike[str], *, md5: bool = False, only_code: bool = True) -> Measured | None:
    """Classify and hash one regular file; None when it is not a regular file (symlink, device, gone).

    The identity is taken from the open descriptor before and after reading:
    a file that changed while being read is read again (once), then refused.
    """
    p = os.fspath(path)
    for _attempt in range(2):
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
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                kind, sha, m5 = hash_reader(f.readinto, md5=md5, only_code=only_code)
            if kind is None and only_code:
                return Measured(p, before, None)
            if Identity.of(os.fstat(fd)) == before:
                return Measured(p, before, kind, sha, m5)
        except OSError as exc:
            raise MeasureDBError(f"{p}: cannot read: {exc.strerror}") from exc
        finally:
            os.close(fd)
    raise MeasureDBError(f"{p}: changed while being measured (twice); measure it again when it is stable")


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
