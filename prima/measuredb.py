"""The measurement DB's store: trusted measurements with their origins, in one SQLite file.

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

What fills it is prima.sources (dpkg, .deb, directories); what the kernel
gets from it is prima.kernelview.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat as stat_mod
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from controlplane.core.errors import MeasureDBError
from prima import measure
from prima.measure import FileKind, Identity, Measured

APPLICATION_ID = 0x63776C64  # "cwld": marks a SQLite file as a cwlite measurement DB
ORIGIN_KINDS = ("deb", "dpkg", "dir")

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


@dataclass(frozen=True)
class Measurement:
    """One measurement and its origin: a source makes it (prima.sources); the store keeps it in `trust_set`."""

    digest: bytes
    origin: str  # "deb" | "dpkg" | "dir"
    package: str  # the package, or for "dir" the directory
    version: str
    path: str
    note: str
    code: FileKind  # "elf", or "script" with its #! line (for policy checks of interpreters)
    untrusted: str = ""  # '' when trusted; else the reason (e.g. "md5sums mismatch")
    trust_set: str = ""  # set by the store when read back


_MEASUREMENT_COLS = "digest, origin, package, version, path, note, file_kind, interpreter, untrusted, trust_set"


def _measurement(row: tuple) -> Measurement:
    digest, origin, package, version, path, note, file_kind, interpreter, untrusted, trust_set = row
    return Measurement(bytes(digest), origin, package, version, path, note, FileKind(file_kind, interpreter), untrusted, trust_set)


@dataclass(frozen=True)
class Change:
    """One trusted measurement added, removed or changed between two DBs (digests as hex; '' where absent)."""

    trust_set: str
    origin: str
    package: str
    path: str
    old_digest: str
    new_digest: str


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

    added: tuple[Change, ...] = ()
    removed: tuple[Change, ...] = ()
    changed: tuple[Change, ...] = ()
    old_digest: bytes = b""
    new_digest: bytes = b""

    def to_dict(self) -> dict:
        def where(c: Change) -> dict:
            return {"trust_set": c.trust_set, "origin": c.origin, "package": c.package, "path": c.path}

        return {
            "old_digest": self.old_digest.hex(),
            "new_digest": self.new_digest.hex(),
            "added": [{**where(c), "digest": c.new_digest} for c in self.added],
            "removed": [{**where(c), "digest": c.old_digest} for c in self.removed],
            "changed": [{**where(c), "old_digest": c.old_digest, "new_digest": c.new_digest} for c in self.changed],
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

    def lookup(self, digest: bytes, *, include_untrusted: bool = False) -> list[Measurement]:
        """The trusted origins of a measurement (with `include_untrusted`, also rows kept only to say why not)."""
        rows = self._conn.execute(
            f"SELECT {_MEASUREMENT_COLS} FROM measurements WHERE digest = ? "
            + ("" if include_untrusted else "AND untrusted = '' ")
            + "ORDER BY trust_set, origin, package, path",
            (bytes(digest),),
        )
        return [_measurement(r) for r in rows]

    def is_trusted(self, digest: bytes, trust_set: str) -> bool:
        self.require_sets([trust_set])
        row = self._conn.execute(
            "SELECT 1 FROM measurements WHERE digest = ? AND trust_set = ? AND untrusted = '' LIMIT 1", (bytes(digest), trust_set)
        ).fetchone()
        return row is not None

    def trusted_digests(self, trust_set: str) -> frozenset[bytes]:
        """Every measurement trusted in `trust_set` (one query: the verifier and the kernel view ask per set)."""
        self.require_sets([trust_set])
        return frozenset(bytes(d) for (d,) in self._conn.execute(
            "SELECT DISTINCT digest FROM measurements WHERE trust_set = ? AND untrusted = ''", (trust_set,)))

    def known_paths(self, trust_sets: Sequence[str]) -> list[str]:
        """Paths measured in `trust_sets`, and every code file of the local cache: where trusted content may be now."""
        q = ",".join("?" * len(trust_sets))
        return [r[0] for r in self._conn.execute(
            f"SELECT DISTINCT path FROM measurements WHERE trust_set IN ({q}) UNION SELECT path FROM files WHERE sha256 IS NOT NULL",
            tuple(trust_sets),
        )]

    def require_sets(self, names: Sequence[str]) -> None:
        """Refuse (one line, naming the defined sets) any of `names` this DB does not define."""
        defined = self.trust_sets()
        for n in names:
            if n not in defined:
                raise MeasureDBError(f"{self.path}: trust set {n!r}: unknown (defined: {', '.join(defined) or 'none'})")

    def origins_at(self, path: str) -> list[Measurement]:
        """Origins recorded for a path (as given, and as resolved through symlinks)."""
        paths = {path, os.path.realpath(path)}
        q = ",".join("?" * len(paths))
        rows = self._conn.execute(
            f"SELECT {_MEASUREMENT_COLS} FROM measurements WHERE path IN ({q}) "
            "ORDER BY trust_set, origin, package, path",
            tuple(paths),
        )
        return [_measurement(r) for r in rows]

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

    def measurements(self, trust_set: str | None = None) -> list[Measurement]:
        """Every measurement (of `trust_set`), trusted or not, sorted by trust set, origin, package, version, path."""
        sql = f"SELECT {_MEASUREMENT_COLS} FROM measurements"
        args: tuple = ()
        if trust_set is not None:
            sql += " WHERE trust_set = ?"
            args = (trust_set,)
        return [_measurement(r) for r in self._conn.execute(sql + " ORDER BY trust_set, origin, package, version, path", args)]

    # -- the local file cache ------------------------------------------------

    def file_cache(self, *, preload: bool = True) -> Callable[[os.stat_result], Measured | None]:
        """A lookup stat() -> the measurement made when the file had the same (dev, ino, size, mtime, ctime).

        `preload` reads the whole cache at once (a build asks about most of
        it); otherwise each lookup is one indexed query (a few files of many).
        """
        cols = "dev, ino, size, mtime_ns, ctime_ns, path, file_kind, interpreter, sha256, md5"

        def measured(r: tuple, st: os.stat_result) -> Measured:
            _dev, _ino, _size, _mtime, _ctime, path, file_kind, interpreter, sha256, md5 = r
            return Measured(path, Identity.of(st), FileKind(file_kind, interpreter) if file_kind else None, sha256, md5)

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

    def replace_trust_set(self, name: str, rows: Sequence[Measurement], *, note: str, sources: dict, local: Sequence[Measured] = ()) -> None:
        """Make `name` hold exactly `rows`, in one transaction (all or nothing); no write when nothing changed."""
        new = {(r.digest, r.origin, r.package, r.version, r.path, r.note, r.code.kind, r.code.interpreter, r.untrusted) for r in rows}
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
                [(name, r.digest, r.origin, r.package, r.version, r.path, r.note, r.code.kind, r.code.interpreter, r.untrusted) for r in rows],
            )
            self._store_files(local)

    def remove_trust_set(self, name: str) -> None:
        self.require_sets([name])
        with self._transaction():
            self._conn.execute("DELETE FROM trust_sets WHERE name = ?", (name,))

    # -- this machine's files ------------------------------------------------

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
        self.require_sets(names)
        want = sorted(
            (m.trust_set, m.path, m.digest)
            for name in names
            for m in self.measurements(name)
            if not m.untrusted and m.origin != "deb"
        )
        now = self.measure_paths({path for _ts, path, _d in want}, rehash=True, progress=progress)
        return [
            Mismatch(ts, path, digest, now[path].sha256 if path in now else None)
            for ts, path, digest in want
            if path not in now or now[path].sha256 != digest
        ]


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


def diff(old: str | os.PathLike[str], new: str | os.PathLike[str]) -> Diff:
    """Measurements added, removed and changed from DB `old` to DB `new`."""
    with MeasureDB.open(old) as a, MeasureDB.open(new) as b:
        def keyed(db: MeasureDB) -> dict[tuple[str, str, str, str], str]:
            return {(m.trust_set, m.origin, m.package, m.path): m.digest.hex() for m in db.measurements() if not m.untrusted}

        ka, kb = keyed(a), keyed(b)
        return Diff(
            added=tuple(Change(*k, "", kb[k]) for k in sorted(kb.keys() - ka.keys())),
            removed=tuple(Change(*k, ka[k], "") for k in sorted(ka.keys() - kb.keys())),
            changed=tuple(Change(*k, ka[k], kb[k]) for k in sorted(ka.keys() & kb.keys()) if ka[k] != kb[k]),
            old_digest=a.digest(),
            new_digest=b.digest(),
        )
