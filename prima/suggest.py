"""From an audit run's violations to the Debian packages that own the code, and the `db build` that trusts them.

Audit mode logs what enforce mode would kill. For each violation that loaded
a file (exec, interpreter, script, mmap, mprotect) this finds the installed
package that owns the file in dpkg's database (`<admindir>/info/*.list`, read
as `db build --from-dpkg` reads it), and proposes the `cwlite db build`
command that rebuilds the label's trust set with those packages added, from the
sources the set was last built from (its `sources` in the DB). A file no
package owns is listed as such and left out of every command: trusting it is a
decision (`--from-dir`), never a side effect. So is a file dpkg owns but whose
content no longer matches dpkg's md5sums (`db build` would store it untrusted).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from controlplane.core.errors import MeasureDBError
from controlplane.core.events import EventKind, parse_ima_name
from controlplane.core.imalog import LogEntry
from prima import debian
from prima.measuredb import MeasureDB

CODE_OPS = frozenset({"exec", "interp", "script", "mmap", "mprotect"})   # violations that name a file of code
SHORTENED = "/.../"     # the tracepoint backend's prefix for a long path it shortened to its last components


@dataclass(frozen=True)
class Violation:
    """A violation of an audit run: label, op, the file as the event names it, and why."""

    label: str
    op: str
    path: str
    why: str = ""
    ino: int | None = None


def violations_from_events(lines: Iterable[str], source: str) -> list[Violation]:
    """Violations in `cwlite enforce --events` JSON lines (a malformed line raises, naming it)."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
            if ev["kind"] != EventKind.VIOLATION.value:
                continue
            detail = ev.get("detail") or {}
            out.append(Violation(ev["label"], ev["op"], ev["subject"], str(detail.get("why", "")),
                                 int(detail["ino"]) if "ino" in detail else None))
        except (ValueError, KeyError, TypeError) as exc:
            raise MeasureDBError(f"{source}:{n}: not a cwlite event line ({exc.__class__.__name__}: {exc})") from exc
    return out


def violations_from_log(entries: Iterable[LogEntry]) -> list[Violation]:
    """Violations in measurement-log entries (the log names no inode or reason: only label, op, path)."""
    out = []
    for e in entries:
        ev = parse_ima_name(e.digest, e.name)
        if ev is not None and ev.kind is EventKind.VIOLATION:
            out.append(Violation(ev.label, ev.op, ev.subject))
    return out


@dataclass(frozen=True)
class Owner:
    """The installed package that ships a file, and whether the file is still what dpkg installed."""

    package: str
    version: str
    listed_path: str          # the path as dpkg lists it (merged /usr: /bin/x for /usr/bin/x)
    modified: bool            # its content differs from dpkg's md5sums: a dpkg build stores it untrusted
    no_md5sums: bool = False  # dpkg records no checksum for it (a conffile, or made by a maintainer script)


class DpkgOwners:
    """Which installed package owns a path: dpkg's file lists indexed by file name, matched by inode.

    Matching by (device, inode) rather than by name finds the owner under any
    name the file has here (merged /usr, a symlinked directory), and a file
    the event names by its path within its file system.
    """

    def __init__(self, admindir: Path = debian.DPKG_ADMINDIR, root: Path = Path("/")) -> None:
        """`admindir`: dpkg's database; `root`: where the files it lists are read (as `db build --dpkg-root`)."""
        self.admindir, self.root = Path(admindir), Path(root)
        self._by_name: dict[str, list[tuple[debian.Installed, str]]] = defaultdict(list)
        self._sums: dict[str, dict[str, str]] = {}
        for pkg in debian.installed_packages(None, admindir=self.admindir, deps=False):
            paths, sums = debian.dpkg_files(pkg, self.admindir)
            self._sums[pkg.info_name] = sums
            for p in paths:
                self._by_name[os.path.basename(p)].append((pkg, p))

    def _stat(self, path: str) -> os.stat_result | None:
        try:
            return os.stat(self.root / path.lstrip("/"))
        except OSError:
            return None

    def owner(self, v: Violation) -> tuple[str, Owner | None]:
        """(the file's path here, or '' when not found; its owner, or None when no package owns it)."""
        name = v.path
        exact = name.startswith("/") and not name.startswith(SHORTENED)
        st = self._stat(name) if exact else None
        tail = name[len(SHORTENED) - 1:] if name.startswith(SHORTENED) else name
        # the package that ships the file itself, not one that ships a symlink to it (bfd-plugins/*.so)
        real = os.path.realpath(self.root / name.lstrip("/")) if st is not None else name
        for pkg, listed in self._by_name.get(os.path.basename(real), ()):
            full = self.root / listed.lstrip("/")
            cand = self._stat(listed)
            if cand is None or os.path.islink(full) or not os.path.isfile(full):
                continue
            same = ((cand.st_dev, cand.st_ino) == (st.st_dev, st.st_ino) if st is not None
                    else listed.endswith(tail) and (v.ino is None or cand.st_ino == v.ino))
            if same:
                return listed if st is None else name, self._owner(pkg, listed)
        return (name if st is not None else ""), None

    def _owner(self, pkg: debian.Installed, listed: str) -> Owner:
        want = self._sums[pkg.info_name].get(listed)
        if want is None:
            return Owner(pkg.package, pkg.version, listed, modified=False, no_md5sums=True)
        with open(self.root / listed.lstrip("/"), "rb") as f:
            got = hashlib.file_digest(f, "md5").hexdigest()
        return Owner(pkg.package, pkg.version, listed, modified=got != want)


@dataclass
class SetSuggestion:
    """What to add to one trust set, and the commands that do it."""

    trust_set: str
    labels: list[str]
    add: list[str]                                           # packages to add (sorted)
    already: list[str] = field(default_factory=list)         # owners already in the set's sources
    commands: list[list[str]] = field(default_factory=list)
    why_already: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["command_lines"] = [shlex.join(c) for c in self.commands]
        return d


@dataclass
class Suggestion:
    """The whole proposal: per file, per trust set, and what no package owns."""

    files: list[dict]
    sets: list[SetSuggestion]
    unowned: list[dict]
    modified: list[dict]
    not_files: list[dict]

    def as_dict(self) -> dict:
        return {"files": self.files, "trust_sets": [s.as_dict() for s in self.sets], "unowned": self.unowned,
                "modified": self.modified, "not_files": self.not_files}


def _recorded_sources(db_path: Path, trust_set: str) -> tuple[dict | None, str]:
    """The sources and note the trust set was last built from (None when the DB or the set does not exist)."""
    if not db_path.exists():
        return None, ""
    with MeasureDB.open(db_path, readonly=True) as db:
        t = db.summary()["trust_sets"].get(trust_set)
    return (t["sources"], t["note"]) if t else (None, "")


def build_commands(trust_set: str, add: Sequence[str], versions: Mapping[str, str], *, db_path: Path,
                   sources: dict | None, note: str) -> tuple[list[list[str]], list[str]]:
    """The commands that rebuild `trust_set` from its recorded sources plus the packages `add`, and the
    packages the recorded sources already name. A set built from .debs gets the new packages through
    the signed archive chain (`apt-get download` of the installed versions into its first directory)."""
    base = ["cwlite", "db", "build", "--db", str(db_path), "--trust-set", trust_set]
    base += ["--note", note] if note else []
    sources = sources or {}
    dirs = [a for d in sources.get("dir", []) for a in ("--from-dir", d)]
    deb = [d for d in sources.get("deb", []) if not d.startswith("packages: ")]
    deb_pkgs = [p for d in sources.get("deb", []) if d.startswith("packages: ") for p in d.split()[1:]]
    dpkg = sources.get("dpkg", [])
    if deb:
        have = set(deb_pkgs)
        new = [p for p in add if p not in have]
        download = ["sh", "-c", f"cd {shlex.quote(deb[0])} && apt-get download "
                    + " ".join(shlex.quote(f"{p}={versions[p]}") for p in new)] if new else None
        cmd = base + [a for d in deb for a in ("--from-deb", d)] + dirs + (sorted(have | set(new)) if deb_pkgs else [])
        return ([download] if download else []) + [cmd], sorted(have & set(add)) if deb_pkgs else []
    if dpkg is True:                         # every installed package: an owner is in it already
        return [base + ["--from-dpkg"] + dirs], list(add)
    have = set(dpkg)
    return [base + ["--from-dpkg", *sorted(have | set(add))] + dirs], sorted(have & set(add))


def suggest(violations: Sequence[Violation], label_sets: Mapping[str, str], *, db_path: Path,
            owners: DpkgOwners) -> Suggestion:
    """The packages owning each violation's file, grouped by the trust set of the violation's label.

    `label_sets`: label -> trust set (the audit run's policy). A violation of a
    label the policy does not name is grouped under the label itself.
    """
    files, unowned, modified, not_files = [], [], [], []
    by_set: dict[str, dict[str, str]] = defaultdict(dict)       # trust set -> package -> version
    labels: dict[str, set[str]] = defaultdict(set)
    seen: set[tuple[str, str]] = set()
    for v in violations:
        if v.op not in CODE_OPS or not v.path:
            not_files.append({"label": v.label, "op": v.op, "subject": v.path, "why": v.why})
            continue
        if (v.label, v.path) in seen:
            continue
        seen.add((v.label, v.path))
        trust_set = label_sets.get(v.label, v.label)
        path, owner = owners.owner(v)
        row = {"label": v.label, "trust_set": trust_set, "op": v.op, "path": v.path, "found": path, "why": v.why,
               "package": owner.package if owner else None, "version": owner.version if owner else None}
        files.append(row)
        if owner is None:
            unowned.append(row)
        elif owner.modified:
            modified.append(row)
        else:
            by_set[trust_set][owner.package] = owner.version
            labels[trust_set].add(v.label)
    sets = []
    for trust_set, pkgs in sorted(by_set.items()):
        sources, note = _recorded_sources(db_path, trust_set)
        cmds, already = build_commands(trust_set, sorted(pkgs), pkgs, db_path=db_path, sources=sources, note=note)
        sets.append(SetSuggestion(trust_set, sorted(labels[trust_set]), sorted(set(pkgs) - set(already)), already, cmds,
                                  "" if not already else "already in the set's sources: the file is not what was "
                                  "measured (changed, open for write, or built before it was installed); rebuild"))
    return Suggestion(files, sets, unowned, modified, not_files)
