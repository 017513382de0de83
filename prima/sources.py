"""Sources of trust -> measurements: Debian archives, dpkg's installed packages, local directories.

`build()` measures every source first, outside any transaction, then makes
one trust set of the store (prima.measuredb) hold exactly what they trust, in
ONE transaction: a build killed at any point leaves the previous DB as it was.
The Debian checks themselves (signed InRelease -> Packages -> .deb; dpkg's
md5sums) are prima.debian's; hashing and the file cache are prima.measure's.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from controlplane.core.errors import MeasureDBError
from prima import debian, measure
from prima.measure import Measured
from prima.measuredb import MeasureDB, Measurement

_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class BuildResult:
    """What one build stored: counts, reused cache hits, the DB digest after it, and the sources it was given."""

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
    if not _SET_NAME.match(trust_set or ""):
        raise MeasureDBError(f"trust set {trust_set!r}: name must be 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    if not (from_deb or from_dpkg or from_dir):
        raise MeasureDBError(f"trust set {trust_set}: no source given (from_deb, from_dpkg or from_dir)")
    deb_dirs = measure.check_dirs(from_deb, "--from-deb")
    dir_dirs = measure.check_dirs(from_dir, "--from-dir")
    rows: list[Measurement] = []
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
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                for n, (deb, ident, members) in enumerate(zip(debs, ids, pool.map(debian.deb_code_files, debs)), 1):
                    rows += [Measurement(m.sha256, "deb", ident.package, ident.version, m.path, note, m.kind) for m in members]
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
                rows.append(Measurement(m.sha256, "dpkg", pkg.package, pkg.version, path, note, m.kind, why))
        for d in dir_dirs:
            files = list(measure.walk(d))
            step = _counter(f"dir {d}", len(files), progress)

            for m in measure.measure_many(files, cache=cache, progress=step):
                reused += m.reused
                local.append(m)
                if m.kind is not None:
                    rows.append(Measurement(m.sha256, "dir", str(d), "", m.path, note, m.kind))
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


def _dedupe(rows: list[Measurement]) -> list[Measurement]:
    seen: dict[tuple, Measurement] = {}
    for r in rows:
        seen.setdefault((r.origin, r.package, r.version, r.path), r)
    return list(seen.values())
