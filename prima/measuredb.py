"""The measurement DB: trusted measurements with their origins, and the kernel's view of them.

One SQLite file in WAL mode (readers never block a build, a build never
blocks readers). The schema is versioned by `PRAGMA user_version` and
upgraded by `MIGRATIONS` in order. A build measures first, outside any
transaction, then replaces its trust set in ONE transaction: a build killed at
any point leaves the previous DB as it was.

Tables:
- `trust_sets`: named subsets of trusted code (a label's `trust` names one).
- `measurements`: one row per (trust set, origin, path): the SHA-256, what
  kind of code it is, and `untrusted` (empty = trusted; otherwise why not,
  e.g. a dpkg md5sums mismatch). Untrusted rows are kept so `show` can say why.
- `files`: what was measured on THIS machine, keyed by (dev, ino) with size,
  mtime and ctime: the incremental cache, and how `kernel_view` knows which
  inode holds which content. It is not part of `digest()`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import stat as stat_mod
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from controlplane.core.errors import MeasureDBError
from prima import measure
from prima.measure import FileKind, Identity, Measured

APPLICATION_ID = 0x63776C64  # "cwld": marks a SQLite file as a cwlite measurement DB
ORIGIN_KINDS = ("deb", "dpkg", "dir")
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Each entry upgrades the schema from version i to i+1 (user_version = len(applied)).
MIGRATIONS: tuple[str, ...] = (
    # 1: trust sets, measurements with origins, the local file cache.
    """
    CREATE TABLE trust_sets(
        name TEXT PRIMARY KEY,
        note TEXT NOT NULL,
        sources TEXT NOT NULL,          -- JSON: what the last build of this set was given
        built_at TEXT NOT NULL
    );
    CREATE TABLE measurements(
        trust_set TEXT NOT NULL REFERENCES trust_sets(name) ON DELETE CASCADE,
        digest BLOB NOT NULL CHECK (length(digest) = 32),
        origin TEXT NOT NULL CHECK (origin IN ('deb', 'dpkg', 'dir')),
        package TEXT NOT NULL,
        version TEXT NOT NULL,
        path TEXT NOT NULL,
        note TEXT NOT NULL,
        file_kind TEXT NOT NULL CHECK (file_kind IN ('elf', 'script')),
        interpreter TEXT NOT NULL,
        untrusted TEXT NOT NULL,        -- '' = trusted; else why not
        PRIMARY KEY (trust_set, origin, package, version, path)
    ) WITHOUT ROWID;
    CREATE TABLE files(
        dev INTEGER NOT NULL,           -- st_dev as userspace encodes it
        ino INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        path TEXT NOT NULL,
        file_kind TEXT,                 -- NULL = not code
        interpreter TEXT NOT NULL,
        sha256 BLOB,
        PRIMARY KEY (dev, ino)
    ) WITHOUT ROWID;
    """,
    # 2: lookups by digest (verifier), dpkg cross-check reuse (md5 kept with the cache).
    """
    CREATE INDEX measurements_by_digest ON measurements(digest);
    ALTER TABLE files ADD COLUMN md5 BLOB;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def kernel_dev(st_dev: int) -> int:
    """Userspace st_dev (glibc's major/minor encoding) -> dev_t as the kernel keeps it in super_block.s_dev.

    The kernel's internal dev_t is MAJOR<<20 | MINOR (include/linux/kdev_t.h),
    which is what a BPF program reads; stat() reports the "huge" encoding
    glibc's major()/minor() decode (major<<8|minor for small numbers).
    """
    return (os.major(st_dev) << 20) | os.minor(st_dev)


@dataclass(frozen=True)
class Origin:
    """Where a trusted measurement comes from: kind "deb" | "dpkg" | "dir", package (or directory), version, path."""

    kind: str
    package: str
    version: str
    path: str
    note: str
    trust_set: str = ""
    untrusted: str = ""  # '' when trusted; else the reason (e.g. "md5sums mismatch")
    code: str = ""  # "elf" | "script"
    interpreter: str = ""  # a script's #! line (interpreter and argument), for policy checks of interpreters


_ORIGIN_COLS = "origin, package, version, path, note, trust_set, untrusted, file_kind, interpreter"


@dataclass(frozen=True)
class KernelEntry:
    """One BPF map entry: key (dev as the kernel encodes it, ino), value (trust-set bitmask, ctime cookie)."""

    dev: int
    ino: int
    ctime_ns: int
    sets_mask: int
    digest: bytes
    path: str


@dataclass(frozen=True)
class Row:
    """One measurement as a source produced it, before it is stored."""

    digest: bytes
    origin: str
    package: str
    version: str
    path: str
    note: str
    kind: FileKind
    untrusted: str = ""


@dataclass(frozen=True)
class Mismatch:
    """What `verify` found: a measured path whose file on disk no longer has the recorded content."""

    trust_set: str
    path: str
    expected: bytes
    actual: bytes | None  # None = missing, not a regular file, or no longer code


@dataclass(frozen=True)
class Diff:
    """Measurements added, removed or changed between two DBs, keyed by (trust set, origin, package, path)."""

    added: tuple[tuple[str, ...], ...] = ()
    removed: tuple[tuple[str, ...], ...] = ()
    changed: tuple[tuple[str, ...], ...] = ()
    old_digest: bytes = b""
    new_digest: bytes = b""

    def to_dict(self) -> dict:
        keys = ("trust_set", "origin", "package", "path", "digest")
        return {
            "old_digest": self.old_digest.hex(),
            "new_digest": self.new_digest.hex(),
            "added": [dict(zip(keys, r)) for r in self.added],
            "removed": [dict(zip(keys, r)) for r in self.removed],
            "changed": [dict(zip((*keys[:4], "old_digest", "new_digest"), r)) for r in self.changed],
        }


class MeasureDB:
    """An open measurement DB. Use as a context manager; `open()` checks, creates and migrates."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    # -- opening ------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> "MeasureDB":
        """Open (with `create`, create) the DB at `path`; refuse a file that is not one, or a newer schema."""
        p = Path(path)
        if not p.exists() and not create:
            raise MeasureDBError(f"{p}: no such measurement DB (build one: cwlite db build ... --db {p})")
        if create:
            p.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(str(p), isolation_level=None, timeout=30.0, check_same_thread=False)
        except sqlite3.Error as exc:
            raise MeasureDBError(f"{p}: cannot open: {exc}") from exc
        db = cls(p, conn)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA busy_timeout = 30000")
            db._check_and_migrate(create)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise MeasureDBError(f"{p}: not a usable measurement DB: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return db

    def _check_and_migrate(self, create: bool) -> None:
        c = self._conn
        app = c.execute("PRAGMA application_id").fetchone()[0]
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if app == 0 and version == 0:
            tables = c.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
            if tables or not create:
                raise MeasureDBError(f"{self.path}: application_id: not a cwlite measurement DB")
        elif app != APPLICATION_ID:
            raise MeasureDBError(f"{self.path}: application_id: {app:#x} is not a cwlite measurement DB")
        if version > SCHEMA_VERSION:
            raise MeasureDBError(f"{self.path}: user_version: schema {version} is newer than this cwlite's ({SCHEMA_VERSION})")
        ok = c.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise MeasureDBError(f"{self.path}: quick_check: {ok}")
        if version < SCHEMA_VERSION:
            migrate(c, SCHEMA_VERSION)
        c.execute("PRAGMA journal_mode = WAL")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "MeasureDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # -- what the verifier and the policy ask --------------------------------

    def trust_sets(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT name FROM trust_sets ORDER BY name")]

    def digest(self) -> bytes:
        """Canonical SHA-256 of the trusted content: every trust set and trusted measurement with its origin.

        Order-independent (rows are sorted), stable across rebuilds of the same
        content (no times, no local file identities). Untrusted rows are out.
        """
        h = hashlib.sha256(b"cwlite-measurement-db-v1\n")
        # One JSON array per line (SQLite's json_array: no locale, fixed escaping), sorted.
        for sql in (
            "SELECT json_array('set', name) FROM trust_sets ORDER BY name",
            "SELECT json_array(trust_set, lower(hex(digest)), origin, package, version, path, note, file_kind, interpreter) "
            "FROM measurements WHERE untrusted = '' ORDER BY trust_set, origin, package, version, path",
        ):
            h.update("".join(line + "\n" for (line,) in self._conn.execute(sql)).encode())
        return h.digest()

    def lookup(self, digest: bytes, *, include_untrusted: bool = False) -> list[Origin]:
        """The trusted origins of a measurement (with `include_untrusted`, also rows kept only to say why not)."""
        rows = self._conn.execute(
            f"SELECT {_ORIGIN_COLS} FROM measurements WHERE digest = ? "
            + ("" if include_untrusted else "AND untrusted = '' ")
            + "ORDER BY trust_set, origin, package, path",
            (bytes(digest),),
        )
        return [Origin(*r) for r in rows]

    def is_trusted(self, digest: bytes, trust_set: str) -> bool:
        self._check_sets([trust_set])
        row = self._conn.execute(
            "SELECT 1 FROM measurements WHERE digest = ? AND trust_set = ? AND untrusted = '' LIMIT 1", (bytes(digest), trust_set)
        ).fetchone()
        return row is not None

    def _check_sets(self, names: Sequence[str]) -> None:
        defined = self.trust_sets()
        for n in names:
            if n not in defined:
                raise MeasureDBError(f"{self.path}: trust set {n!r}: unknown (defined: {', '.join(defined) or 'none'})")

    def origins_at(self, path: str) -> list[Origin]:
        """Origins recorded for a path (as given, and as resolved through symlinks)."""
        paths = {path, os.path.realpath(path)}
        q = ",".join("?" * len(paths))
        rows = self._conn.execute(
            f"SELECT {_ORIGIN_COLS} FROM measurements WHERE path IN ({q}) "
            "ORDER BY trust_set, origin, package, path",
            tuple(paths),
        )
        return [Origin(*r) for r in rows]

    def summary(self) -> dict:
        """Schema version, digest, and per trust set the counts by origin kind (for `cwlite db show`)."""
        sets = {}
        for name, note, sources, built in self._conn.execute("SELECT name, note, sources, built_at FROM trust_sets ORDER BY name"):
            counts = {
                f"{origin}{'' if trusted else '_untrusted'}": n
                for origin, trusted, n in self._conn.execute(
                    "SELECT origin, untrusted = '', count(*) FROM measurements WHERE trust_set = ? GROUP BY 1, 2", (name,)
                )
            }
            sets[name] = {"note": note, "sources": json.loads(sources), "built_at": built, "measurements": counts}
        return {"path": str(self.path), "schema_version": self.schema_version, "digest": self.digest().hex(), "trust_sets": sets}

    def measurements(self, trust_set: str | None = None) -> list[tuple]:
        """(trust_set, origin, package, version, path, digest, untrusted) rows, sorted."""
        sql = "SELECT trust_set, origin, package, version, path, digest, untrusted FROM measurements"
        args: tuple = ()
        if trust_set is not None:
            sql += " WHERE trust_set = ?"
            args = (trust_set,)
        return list(self._conn.execute(sql + " ORDER BY 1, 2, 3, 4, 5", args))

    # -- the local file cache ------------------------------------------------

    def file_cache(self, *, preload: bool = True) -> Callable[[os.stat_result], Measured | None]:
        """A lookup stat() -> the measurement made when the file had the same (dev, ino, size, mtime, ctime).

        `preload` reads the whole cache at once (a build asks about most of
        it); otherwise each lookup is one indexed query (a few files of many).
        """
        cols = "dev, ino, size, mtime_ns, ctime_ns, path, file_kind, interpreter, sha256, md5"

        def measured(r: tuple, st: os.stat_result) -> Measured:
            return Measured(r[5], Identity.of(st), FileKind(r[6], r[7]) if r[6] else None, r[8], r[9])

        if preload:
            cache = {r[:5]: r for r in self._conn.execute(f"SELECT {cols} FROM files")}

            def get(st: os.stat_result) -> Measured | None:
                r = cache.get((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
                return None if r is None else measured(r, st)

            return get

        def query(st: os.stat_result) -> Measured | None:
            r = self._conn.execute(
                f"SELECT {cols} FROM files WHERE dev = ? AND ino = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ?",
                (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
            ).fetchone()
            return None if r is None else measured(r, st)

        return query

    def _store_files(self, measured: Iterable[Measured]) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO files(dev, ino, size, mtime_ns, ctime_ns, path, file_kind, interpreter, sha256, md5) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            [
                (m.ident.dev, m.ident.ino, m.ident.size, m.ident.mtime_ns, m.ident.ctime_ns, m.path,
                 m.kind.kind if m.kind else None, m.kind.interpreter if m.kind else "", m.sha256, m.md5)
                for m in measured
            ],
        )

    def remember(self, measured: Sequence[Measured]) -> None:
        """Store fresh local measurements in the cache (not trusted content: digest() is unchanged)."""
        if not measured:
            return
        try:
            with self._transaction():
                self._store_files(measured)
        except sqlite3.OperationalError:
            pass  # a read-only DB: the cache only saves time

    # -- writing --------------------------------------------------------------

    def _transaction(self):
        return _Transaction(self._conn)

    def replace_trust_set(self, name: str, rows: Sequence[Row], *, note: str, sources: dict, local: Sequence[Measured] = ()) -> None:
        """Make `name` hold exactly `rows`, in one transaction (all or nothing); no write when nothing changed."""
        new = {(r.digest, r.origin, r.package, r.version, r.path, r.note, r.kind.kind, r.kind.interpreter, r.untrusted) for r in rows}
        old_set = self._conn.execute("SELECT note, sources FROM trust_sets WHERE name = ?", (name,)).fetchone()
        if old_set == (note, json.dumps(sources, sort_keys=True)) and not local:
            old = set(self._conn.execute(
                "SELECT digest, origin, package, version, path, note, file_kind, interpreter, untrusted FROM measurements WHERE trust_set = ?", (name,)))
            if old == new:
                return
        with self._transaction():
            self._conn.execute("DELETE FROM measurements WHERE trust_set = ?", (name,))
            self._conn.execute(
                "INSERT OR REPLACE INTO trust_sets(name, note, sources, built_at) VALUES (?,?,?,?)",
                (name, note, json.dumps(sources, sort_keys=True), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
            )
            self._conn.executemany(
                "INSERT OR REPLACE INTO measurements(trust_set, digest, origin, package, version, path, note, file_kind, interpreter, untrusted) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(name, r.digest, r.origin, r.package, r.version, r.path, r.note, r.kind.kind, r.kind.interpreter, r.untrusted) for r in rows],
            )
            self._store_files(local)

    def remove_trust_set(self, name: str) -> None:
        self._check_sets([name])
        with self._transaction():
            self._conn.execute("DELETE FROM trust_sets WHERE name = ?", (name,))

    # -- the kernel's view ----------------------------------------------------

    def kernel_view(self, trust_sets: Sequence[str]) -> list[KernelEntry]:
        """BPF map entries for files on this machine whose current content is trusted in `trust_sets`.

        Bit i of `sets_mask` is trust_sets[i] (the policy fixes the order).
        Candidates are the paths the DB knows (measured paths and the local
        cache); each is stat()ed (following symlinks, so /bin/ls of a
        merged-/usr system is /usr/bin/ls's inode), and a file whose
        size/mtime/ctime changed since it was measured is measured again: if
        its content is no longer trusted, it is not in the view.
        """
        self._check_sets(trust_sets)
        if len(trust_sets) > 64:
            raise MeasureDBError(f"{self.path}: kernel view: {len(trust_sets)} trust sets; at most 64 fit the bitmask")
        masks: dict[bytes, int] = {}
        for i, name in enumerate(trust_sets):
            for (d,) in self._conn.execute("SELECT DISTINCT digest FROM measurements WHERE trust_set = ? AND untrusted = ''", (name,)):
                masks[d] = masks.get(d, 0) | (1 << i)
        q = ",".join("?" * len(trust_sets))
        paths = [r[0] for r in self._conn.execute(
            f"SELECT DISTINCT path FROM measurements WHERE trust_set IN ({q}) UNION SELECT path FROM files WHERE sha256 IS NOT NULL",
            tuple(trust_sets),
        )]
        ids = KernelIdentity()
        current = self.measure_paths(paths + ids.overlay_layer_paths(paths))
        entries: dict[tuple[int, int], KernelEntry] = {}
        for m in current.values():
            mask = masks.get(m.sha256 or b"", 0)
            if not mask:
                continue
            key = (ids.dev(m.path, m.ident.dev), m.ident.ino)
            # Two files on one key (btrfs subvolumes repeat inode numbers): keep the first; the
            # other's ctime cookie will not match, so it is denied (fail closed), never confused.
            entries.setdefault(key, KernelEntry(key[0], key[1], m.ident.ctime_ns, mask, m.sha256, m.path))
        return sorted(entries.values(), key=lambda e: (e.dev, e.ino))

    def measure_paths(self, paths: Iterable[str], *, rehash: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, Measured]:
        """Current measurement of each path that is a regular file (symlinks followed), by the path given.

        Each inode is read at most once (hard links, /bin vs /usr/bin), from
        the cache unless it changed or `rehash`; fresh measurements are
        remembered in the cache. Missing paths are left out.
        """
        by_inode: dict[tuple[int, int], tuple[str, os.stat_result]] = {}
        inode_of: dict[str, tuple[int, int]] = {}
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if stat_mod.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                inode_of[p] = key
                if key not in by_inode:  # measure_file does not follow a final symlink: give it the target
                    by_inode[key] = (p if stat_mod.S_ISREG(os.lstat(p).st_mode) else os.path.realpath(p), st)
        known = self.file_cache(preload=False)
        measured = {(m.ident.dev, m.ident.ino): m for m in measure.measure_many(
            by_inode.values(), cache=None if rehash else known, progress=progress)}
        self.remember([m for m in measured.values() if not m.reused])
        return {p: measured[key] for p, key in inode_of.items() if key in measured}

    def verify(self, trust_sets: Sequence[str] | None = None, *, progress: Callable[[int], None] | None = None) -> list[Mismatch]:
        """Re-hash every file measured on this machine (dpkg and dir origins) of `trust_sets` (all when None).

        Reports each whose content is no longer the measurement (or that is
        gone). A deb origin describes an archive, not this machine: not checked.
        """
        names = self.trust_sets() if trust_sets is None else list(trust_sets)
        self._check_sets(names)
        want = sorted(
            (ts, path, digest)
            for name in names
            for ts, origin, _pkg, _ver, path, digest, untrusted in self.measurements(name)
            if not untrusted and origin != "deb"
        )
        now = self.measure_paths({path for _ts, path, _d in want}, rehash=True, progress=progress)
        return [
            Mismatch(ts, path, digest, now[path].sha256 if path in now else None)
            for ts, path, digest in want
            if path not in now or now[path].sha256 != digest
        ]


# -- file identity as the kernel sees it ---------------------------------------


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, the superblock's device (st_dev encoding), type, super options."""

    point: str
    dev: int
    fstype: str
    options: Mapping[str, str]


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
        out.append(Mount(_unescape(f[4]), os.makedev(major, minor), r[0], opts))
    return out


class KernelIdentity:
    """Maps what stat() says to what the kernel keys on: super_block.s_dev (kernel encoding) per file.

    stat()'s st_dev is the superblock's device on most filesystems (ext4,
    xfs, tmpfs, overlayfs), but btrfs reports a per-subvolume anonymous
    device while its inodes carry the one superblock's s_dev (and inode
    numbers repeat across subvolumes). A file whose st_dev is no mounted
    superblock's is mapped through the mount that holds it.
    """

    def __init__(self, mount_list: Sequence[Mount] | None = None) -> None:
        self.mounts = list(mounts() if mount_list is None else mount_list)
        self._sb_devs = {m.dev for m in self.mounts}
        self._by_depth = sorted(self.mounts, key=lambda m: len(m.point), reverse=True)

    def dev(self, path: str, st_dev: int) -> int:
        """The kernel's dev_t for the file at `path` whose stat() gave `st_dev`."""
        if st_dev in self._sb_devs or not self.mounts:
            return kernel_dev(st_dev)
        real = os.path.realpath(path)
        for m in self._by_depth:
            if real == m.point or real.startswith(m.point.rstrip("/") + "/"):
                return kernel_dev(m.dev)
        return kernel_dev(st_dev)

    def overlay_layer_paths(self, paths: Iterable[str]) -> list[str]:
        """For files on an overlayfs, the layer file the overlay shows (the topmost layer holding it).

        exec() through an overlay is seen by the kernel as the overlay's inode
        (s_dev of the overlay), but mmap() maps the layer's own file (overlayfs
        swaps vm_file for the real file): the kernel view needs both identities.
        """
        overlays = {m.dev: m for m in self.mounts if m.fstype == "overlay"}
        if not overlays:
            return []
        out = []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                continue
            m = overlays.get(st.st_dev)
            if m is None:
                continue
            layers = [m.options["upperdir"]] if m.options.get("upperdir") else []
            layers += [x for x in re.split(r"(?<!\\):", m.options.get("lowerdir", "")) if x]
            rel = os.path.relpath(os.path.realpath(p), m.point)
            for layer in layers:
                candidate = os.path.join(_unescape(layer).replace("\\:", ":").replace("\\,", ","), rel)
                if os.path.lexists(candidate):
                    out.append(candidate)
                    break
        return out


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (the connection is in autocommit mode)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def migrate(conn: sqlite3.Connection, upto: int = SCHEMA_VERSION) -> None:
    """Apply MIGRATIONS from the DB's user_version up to `upto`, each in its own transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for target in range(version + 1, upto + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[target - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (executescript would COMMIT behind our back)."""
    lines = [ln.split("--", 1)[0] for ln in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# -- building ------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    trust_set: str
    measured: int
    untrusted: int
    reused: int
    digest: bytes
    sources: dict = field(default_factory=dict)


def build(
    db_path: str | os.PathLike[str],
    *,
    from_deb: Sequence[str | os.PathLike[str]] = (),
    deb_packages: Sequence[str] = (),
    from_dpkg: Sequence[str] | bool = (),
    from_dir: Sequence[str | os.PathLike[str]] = (),
    trust_set: str,
    note: str = "",
    deps: bool = True,
    lists_dir: str | os.PathLike[str] | None = None,
    keyrings: Sequence[str | os.PathLike[str]] | None = None,
    dpkg_admindir: str | os.PathLike[str] | None = None,
    dpkg_root: str | os.PathLike[str] = "/",
    progress: Callable[[str, int, int], None] | None = None,
) -> BuildResult:
    """Measure the given sources and make `trust_set` hold exactly what they trust (one transaction).

    - from_deb: directories of .deb files, each checked back to apt's signed InRelease;
      with `deb_packages`, only those packages and (unless `deps` is False)
      what they depend on, resolved from the verified Packages stanzas: a
      dependency with no .deb in the directories is an error.
    - from_dpkg: installed package names (True = all installed), with their
      dependencies unless `deps` is False; each file is cross-checked with
      dpkg's md5sums (a mismatch is stored as untrusted). `dpkg_root` is where
      the files are read (a copy of a system for tests or offline images).
    - from_dir: directories the site builds itself; origin = the directory, `note`.
    Nothing is written until every source has been measured and checked.
    """
    from prima import debian

    if not _SET_NAME.match(trust_set or ""):
        raise MeasureDBError(f"trust set {trust_set!r}: name must be 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    if not (from_deb or from_dpkg or from_dir):
        raise MeasureDBError(f"trust set {trust_set}: no source given (from_deb, from_dpkg or from_dir)")
    deb_dirs = measure.check_dirs(from_deb, "--from-deb")
    dir_dirs = measure.check_dirs(from_dir, "--from-dir")
    rows: list[Row] = []
    local: list[Measured] = []
    reused = 0
    tick = progress or (lambda phase, done, total: None)
    db = MeasureDB.open(db_path, create=True)
    try:
        cache = db.file_cache()
        if deb_dirs:
            indexes = debian.verified_indexes(Path(lists_dir) if lists_dir else debian.LISTS_DIR, [Path(k) for k in keyrings] if keyrings is not None else None)
            debs = debian.debs_in(deb_dirs)
            if not debs:
                raise MeasureDBError(f"{', '.join(map(str, deb_dirs))}: --from-deb: no .deb files")
            ids = [debian.check_deb(d, indexes) for d in debs]
            if deb_packages:
                available: dict[str, list] = {}
                for i in ids:
                    available.setdefault(i.package, []).append(i.stanza)
                keep = set(debian.closure(list(deb_packages), available, where=", ".join(map(str, deb_dirs)),
                                          missing="no verified .deb here", deps=deps))
                debs, ids = [d for d, i in zip(debs, ids) if i.package in keep], [i for i in ids if i.package in keep]
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                for n, (deb, ident, members) in enumerate(zip(debs, ids, pool.map(debian.deb_code_files, debs)), 1):
                    rows += [Row(m.sha256, "deb", ident.package, ident.version, m.path, note, m.kind) for m in members]
                    tick("deb", n, len(debs))
        if from_dpkg:
            admindir = Path(dpkg_admindir) if dpkg_admindir else debian.DPKG_ADMINDIR
            root = Path(dpkg_root)
            pkgs = debian.installed_packages(None if from_dpkg is True else list(from_dpkg), admindir=admindir, deps=deps)
            listed = []  # (package, path as dpkg lists it, path read, md5 dpkg recorded)
            for pkg in pkgs:
                paths, sums = debian.dpkg_files(pkg, admindir)
                listed += [(pkg, p, str(root / p.lstrip("/")), sums.get(p)) for p in paths]
            got = {m.path: m for m in measure.measure_many(
                ((full, None) for _pkg, _p, full, _sum in listed), cache=cache, md5=True,
                progress=_counter("dpkg", len(listed), progress))}
            for pkg, path, full, want in listed:
                m = got.pop(full, None)
                if m is None:
                    continue  # a directory, a symlink, or not there
                reused += m.reused
                local.append(m)
                if m.kind is None:
                    continue
                why = ("no md5sums entry (conffile or not shipped by dpkg)" if want is None
                       else "" if m.md5 and m.md5.hex() == want else f"md5sums mismatch (dpkg: {want}, file: {m.md5.hex() if m.md5 else '?'})")
                rows.append(Row(m.sha256, "dpkg", pkg.package, pkg.version, path, note, m.kind, why))
        for d in dir_dirs:
            files = list(measure.walk(d))
            step = _counter(f"dir {d}", len(files), progress)

            for m in measure.measure_many(files, cache=cache, progress=step):
                reused += m.reused
                local.append(m)
                if m.kind is not None:
                    rows.append(Row(m.sha256, "dir", str(d), "", m.path, note, m.kind))
        sources = {
            "deb": [str(d) for d in deb_dirs] + ([f"packages: {' '.join(sorted(deb_packages))}"] if deb_packages else []),
            "dpkg": (True if from_dpkg is True else sorted(from_dpkg)) if from_dpkg else [],
            "dir": [str(d) for d in dir_dirs],
        }
        db.replace_trust_set(trust_set, _dedupe(rows), note=note, sources=sources, local=[m for m in local if not m.reused])
        untrusted = sum(1 for r in rows if r.untrusted)
        return BuildResult(trust_set, len(rows), untrusted, reused, db.digest(), sources)
    finally:
        db.close()


def _counter(phase: str, total: int, progress: Callable[[str, int, int], None] | None) -> Callable[[int], None] | None:
    """Adapt a (phase, done, total) progress callback to measure_many's per-file ticks."""
    if progress is None:
        return None
    done = 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        progress(phase, done, total)

    return step


def _dedupe(rows: list[Row]) -> list[Row]:
    seen: dict[tuple, Row] = {}
    for r in rows:
        seen.setdefault((r.origin, r.package, r.version, r.path), r)
    return list(seen.values())


def diff(old: str | os.PathLike[str], new: str | os.PathLike[str]) -> Diff:
    """Measurements added, removed and changed from DB `old` to DB `new`."""
    with MeasureDB.open(old) as a, MeasureDB.open(new) as b:
        def keyed(db: MeasureDB) -> dict[tuple[str, ...], str]:
            return {(ts, o, pk, p): d.hex() for ts, o, pk, _v, p, d, u in db.measurements() if not u}

        ka, kb = keyed(a), keyed(b)
        return Diff(
            added=tuple((*k, kb[k]) for k in sorted(kb.keys() - ka.keys())),
            removed=tuple((*k, ka[k]) for k in sorted(ka.keys() - kb.keys())),
            changed=tuple((*k, ka[k], kb[k]) for k in sorted(ka.keys() & kb.keys()) if ka[k] != kb[k]),
            old_digest=a.digest(),
            new_digest=b.digest(),
        )
