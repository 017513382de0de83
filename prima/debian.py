"""Debian as a source of trust: signed archives and dpkg's installed packages.

The archive chain, checked before anything in it is parsed:

    InRelease  (OpenPGP signature checked by gpgv against the keyrings apt trusts)
      -> Packages index  (its SHA256 and size must equal the InRelease entry)
        -> .deb  (its SHA256 and size must equal the Packages stanza)
          -> each file of data.tar.*  (measured here)

apt keeps indexes compressed under /var/lib/apt/lists (lz4 here); they are
decompressed with apt's own `apt-helper cat-file`, and the InRelease checksum
is that of the decompressed `Packages`, as apt checks it.

dpkg's installed packages are weaker evidence (a root user can change files
and dpkg's database alike); every file is cross-checked against dpkg's
`md5sums`, and a mismatch is recorded as untrusted.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import subprocess
import tarfile
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence
from urllib.parse import unquote

from debian.deb822 import Packages, Release
from debian.debfile import DebError, DebFile

from controlplane.core.errors import MeasureDBError
from prima.measure import FileKind, hash_reader

LISTS_DIR = Path("/var/lib/apt/lists")
DPKG_ADMINDIR = Path("/var/lib/dpkg")
APT_HELPER = "/usr/lib/apt/apt-helper"
ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
TRUSTED_GPG_D = Path("/etc/apt/trusted.gpg.d")
_COMPRESSED = (".lz4", ".xz", ".gz", ".bz2", ".zst", ".lzma")


def apt_keyrings() -> list[Path]:
    """The keyrings apt trusts for Debian: the archive keyring and /etc/apt/trusted.gpg.d/*."""
    rings = [ARCHIVE_KEYRING] if ARCHIVE_KEYRING.exists() else []
    if TRUSTED_GPG_D.is_dir():
        rings += sorted(p for p in TRUSTED_GPG_D.iterdir() if p.suffix in (".gpg", ".asc"))
    return rings


def _binary_keyring(ring: Path, tmp: Path) -> Path:
    """gpgv reads binary keyrings only: an ASCII-armored .asc is unwrapped (base64) as apt does."""
    if ring.suffix != ".asc":
        return ring
    body = []
    lines = ring.read_text().splitlines()
    try:
        start = lines.index("") + 1
    except ValueError:
        raise MeasureDBError(f"{ring}: not an ASCII-armored OpenPGP key block") from None
    for line in lines[start:]:
        if line.startswith("-----") or line.startswith("="):
            break
        body.append(line.strip())
    out = tmp / (ring.stem + ".gpg")
    out.write_bytes(base64.b64decode("".join(body)))
    return out


def verify_inrelease(path: Path, keyrings: Sequence[Path]) -> str | None:
    """The signed text of an InRelease file after gpgv checked it; None when no trusted key signed it.

    At least one signature must be valid under `keyrings` and none may be bad:
    a modified signed part gives BADSIG, which raises (someone tampered with
    apt's lists). Only the text gpgv returns is parsed, never the file itself.
    """
    if not keyrings:
        raise MeasureDBError(f"{path}: no OpenPGP keyring to check it against (install debian-archive-keyring)")
    with tempfile.TemporaryDirectory(prefix="cwlite-gpgv-") as tmp:
        args = ["gpgv", "--status-fd", "2", "--output", "-"]
        for ring in keyrings:
            args += ["--keyring", str(_binary_keyring(ring, Path(tmp)))]
        try:
            proc = subprocess.run([*args, str(path)], capture_output=True, env={**os.environ, "LC_ALL": "C"}, cwd=tmp)
        except FileNotFoundError:
            raise MeasureDBError(f"{path}: gpgv not installed (make setup installs it)") from None
    status = [ln.split()[1:] for ln in proc.stderr.decode(errors="replace").splitlines() if ln.startswith("[GNUPG:] ")]
    kinds = {s[0] for s in status if s}
    if "BADSIG" in kinds:
        raise MeasureDBError(f"{path}: signature: BAD signature (the signed text was modified)")
    if "VALIDSIG" not in kinds or not proc.stdout:
        return None
    return proc.stdout.decode("utf-8")


@dataclass(frozen=True)
class PackageIndex:
    """A Packages index whose SHA256 matched a verified InRelease; lookups by package name."""

    path: Path
    text: bytes
    starts: dict[bytes, tuple[int, ...]]

    def stanzas(self, name: str) -> Iterator[dict[str, str]]:
        for start in self.starts.get(name.encode(), ()):
            end = self.text.find(b"\n\n", start)
            yield Packages(self.text[start : end if end >= 0 else len(self.text)].decode("utf-8"))

    def by_sha256(self, sha256_hex: str) -> dict[str, str] | None:
        at = self.text.find(f"\nSHA256: {sha256_hex}\n".encode())
        if at < 0:
            return None
        start = self.text.rfind(b"\n\n", 0, at) + 2 if self.text.rfind(b"\n\n", 0, at) >= 0 else 0
        end = self.text.find(b"\n\n", at)
        return Packages(self.text[start : end if end >= 0 else len(self.text)].decode("utf-8"))


_PACKAGE_LINE = re.compile(rb"^Package: (\S+)$", re.M)


@functools.lru_cache(maxsize=4)
def _load_index(path: str, size: int, mtime_ns: int, want_sha256: str, want_size: int, rel: str, release: str) -> PackageIndex:
    proc = subprocess.run([APT_HELPER, "cat-file", path], capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise MeasureDBError(f"{path}: cannot decompress: {err[-1] if err else 'apt-helper failed'}")
    text = proc.stdout
    got = hashlib.sha256(text).hexdigest()
    if len(text) != want_size:
        raise MeasureDBError(f"{path}: Size {len(text)} differs from {release} ({rel}: {want_size})")
    if got != want_sha256:
        raise MeasureDBError(f"{path}: SHA256 {got} differs from {release} ({rel}: {want_sha256})")
    starts: dict[bytes, list[int]] = defaultdict(list)
    for m in _PACKAGE_LINE.finditer(text):
        starts[m.group(1)].append(m.start())
    return PackageIndex(Path(path), text, {k: tuple(v) for k, v in starts.items()})


@dataclass(frozen=True)
class Indexes:
    """The verified Packages indexes, and the InRelease files not used (with why) for error messages."""

    verified: tuple[PackageIndex, ...]
    not_used: tuple[str, ...]

    def __iter__(self) -> Iterator[PackageIndex]:
        return iter(self.verified)


def verified_indexes(lists_dir: Path = LISTS_DIR, keyrings: Sequence[Path] | None = None) -> Indexes:
    """Every binary Packages index under `lists_dir` whose chain back to a signed InRelease holds.

    A bad signature or a Packages file that differs from its InRelease entry
    refuses the whole build (one line naming the file and field). An InRelease
    signed by no trusted key, or past its Valid-Until, is not used.
    """
    keyrings = apt_keyrings() if keyrings is None else list(keyrings)
    if not lists_dir.is_dir():
        raise MeasureDBError(f"{lists_dir}: no apt lists directory (run apt-get update)")
    indexes: list[PackageIndex] = []
    not_used: list[str] = []
    for inrelease in sorted(lists_dir.glob("*_InRelease")):
        text = verify_inrelease(inrelease, keyrings)
        if text is None:
            not_used.append(f"{inrelease.name}: no signature by a trusted key")
            continue
        release = Release(text)
        if release.get("Valid-Until") and parsedate_to_datetime(release["Valid-Until"]) < datetime.now(timezone.utc):
            not_used.append(f"{inrelease.name}: Valid-Until {release['Valid-Until']} has passed")
            continue
        entries = {e["name"]: e for e in release.get("SHA256", [])}
        prefix = inrelease.name[: -len("InRelease")]
        for pk in sorted(lists_dir.glob(prefix + "*_binary-*_Packages*")):
            stem = pk.name[len(prefix) :]
            for ext in _COMPRESSED:
                stem = stem.removesuffix(ext)
            rel = unquote(stem.replace("_", "/"))
            entry = entries.get(rel)
            if entry is None:
                raise MeasureDBError(f"{pk}: SHA256: no entry {rel} in {inrelease.name}")
            st = pk.stat()
            indexes.append(_load_index(str(pk), st.st_size, st.st_mtime_ns, entry["sha256"], int(entry["size"]), rel, inrelease.name))
    return Indexes(tuple(indexes), tuple(not_used))


@dataclass(frozen=True)
class DebId:
    """A .deb that matched a verified Packages stanza (kept: its Depends drive trust-set closure)."""

    package: str
    version: str
    architecture: str
    stanza: Mapping = field(default_factory=dict, compare=False, repr=False)


def check_deb(deb: Path, indexes: Indexes) -> DebId:
    """Check a .deb's size and SHA256 against the verified Packages indexes (before parsing it)."""
    try:
        with open(deb, "rb", buffering=0) as f:
            _kind, digest, _ = hash_reader(f.readinto, only_code=False)
        size = deb.stat().st_size
    except OSError as exc:
        raise MeasureDBError(f"{deb}: cannot read: {exc.strerror}") from exc
    hexd = (digest or b"").hex()
    # The name apt-get download gives: <package>_<version with %3a for ':'>_<arch>.deb
    parts = deb.name.removesuffix(".deb").split("_")
    claimed = [DebId(parts[0], unquote(parts[1]), parts[2])] if len(parts) == 3 else []
    for want in claimed:
        for idx in indexes:
            for st in idx.stanzas(want.package):
                if st.get("Version") != want.version or st.get("Architecture") != want.architecture:
                    continue
                where = f"{idx.path.name} {want.package} {want.version}"
                if int(st.get("Size", -1)) != size:
                    raise MeasureDBError(f"{deb}: Size {size} differs from Packages ({where}: {st.get('Size')})")
                if st.get("SHA256") != hexd:
                    raise MeasureDBError(f"{deb}: SHA256 {hexd} differs from Packages ({where}: {st.get('SHA256')})")
                return _same_control(deb, DebId(st["Package"], st["Version"], st["Architecture"], st))
    for idx in indexes:
        st = idx.by_sha256(hexd)
        if st is not None and int(st.get("Size", -1)) == size:
            return _same_control(deb, DebId(st["Package"], st["Version"], st["Architecture"], st))
    skipped = f"; not used: {', '.join(indexes.not_used)}" if indexes.not_used else ""
    raise MeasureDBError(f"{deb}: SHA256 {hexd} is in no verified Packages index ({len(indexes.verified)} checked{skipped})")


def _same_control(deb: Path, expect: DebId) -> DebId:
    """The verified .deb's own control must name what the index said (it cannot differ if SHA-256 holds)."""
    ctrl = _open_deb(deb).debcontrol()
    for name, want in (("Package", expect.package), ("Version", expect.version), ("Architecture", expect.architecture)):
        if ctrl.get(name) != want:
            raise MeasureDBError(f"{deb}: control {name} {ctrl.get(name)!r} differs from Packages ({want!r})")
    return expect


def _open_deb(deb: Path) -> "DebFile":
    try:
        return DebFile(str(deb))
    except (DebError, OSError, EOFError, ValueError) as exc:
        raise MeasureDBError(f"{deb}: not a readable .deb: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


@dataclass(frozen=True)
class DebMember:
    """A code file inside a .deb's data.tar: its install path, kind and measurement."""

    path: str
    kind: FileKind
    sha256: bytes


def deb_code_files(deb: Path) -> list[DebMember]:
    """Measure every code file in a (verified) .deb's data.tar, in archive order."""
    out: list[DebMember] = []
    by_name: dict[str, DebMember] = {}
    try:
        tar = _open_deb(deb).data.tgz()
        for m in tar:
            name = "/" + os.path.normpath(m.name).lstrip("./")
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                kind, digest, _ = hash_reader(f.readinto)
                if kind is not None and digest is not None:
                    by_name[name] = DebMember(name, kind, digest)
                    out.append(by_name[name])
            elif m.islnk():
                target = by_name.get("/" + os.path.normpath(m.linkname).lstrip("./"))
                if target is not None:
                    out.append(DebMember(name, target.kind, target.sha256))
    except (tarfile.TarError, DebError, EOFError, OSError, ValueError) as exc:
        raise MeasureDBError(f"{deb}: data.tar: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return out


def debs_in(dirs: Iterable[Path]) -> list[Path]:
    """The .deb files in each directory (not recursive), sorted."""
    out: list[Path] = []
    for d in dirs:
        out += sorted(p for p in d.iterdir() if p.suffix == ".deb" and p.is_file())
    return out


# -- dpkg -------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """An installed package as dpkg records it."""

    package: str
    version: str
    architecture: str
    info_name: str  # the stem of its files under <admindir>/info (with :arch for Multi-Arch: same)


def _status(admindir: Path) -> dict[str, list[dict[str, str]]]:
    path = admindir / "status"
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise MeasureDBError(f"{path}: cannot read dpkg status: {exc.strerror}") from exc
    out: dict[str, list] = defaultdict(list)
    with fh:
        for p in Packages.iter_paragraphs(fh):
            if p.get("Status", "").endswith(" installed"):
                out[p["Package"]].append(p)
    return out


def closure(names: Sequence[str], available: Mapping[str, Sequence[Mapping]], *, where: str, missing: str, deps: bool = True) -> list[str]:
    """`names` and, with `deps`, everything they Depend or Pre-Depend on among `available` stanzas.

    Of alternatives the first available one is taken; a virtual package
    resolves to an available provider. A name or dependency that is not
    available is an error (fail closed): "<where>: package P: Depends X: <missing>".
    """
    provides: dict[str, list[str]] = defaultdict(list)
    for name, stanzas in available.items():
        for p in stanzas:
            for group in p.relations["provides"]:
                provides[group[0]["name"]].append(name)
    for n in names:
        if n not in available:
            raise MeasureDBError(f"{where}: package {n}: {missing}")
    seen: dict[str, None] = {}
    queue = list(names)
    while queue:
        name = queue.pop(0)
        if name in seen:
            continue
        seen[name] = None
        if not deps:
            continue
        for p in available[name]:
            for group in p.relations["pre-depends"] + p.relations["depends"]:
                pick = next((r["name"] for r in group if r["name"] in available), None)
                if pick is None:
                    pick = next((provides[r["name"]][0] for r in group if provides.get(r["name"])), None)
                if pick is None:
                    raise MeasureDBError(f"{where}: package {name}: Depends {' | '.join(r['name'] for r in group)}: {missing}")
                queue.append(pick)
    return list(seen)


def installed_packages(names: Sequence[str] | None, *, admindir: Path = DPKG_ADMINDIR, deps: bool = True) -> list[Installed]:
    """Installed packages named (all when `names` is None), with what they depend on when `deps` (see closure)."""
    status = _status(admindir)
    wanted = sorted(status) if names is None else list(names)
    out = []
    for name in closure(wanted, status, where=str(admindir / "status"), missing="not installed", deps=deps):
        for p in status[name]:
            arch = p.get("Architecture", "")
            info = name if (admindir / "info" / f"{name}.list").exists() else f"{name}:{arch}"
            out.append(Installed(name, p.get("Version", ""), arch, info))
    return out


def dpkg_files(pkg: Installed, admindir: Path = DPKG_ADMINDIR) -> tuple[list[str], dict[str, str]]:
    """The paths dpkg installed for `pkg` (from <info>.list) and its md5sums (path -> hex)."""
    info = admindir / "info"
    try:
        paths = (info / f"{pkg.info_name}.list").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as exc:
        raise MeasureDBError(f"{info / (pkg.info_name + '.list')}: cannot read: {exc.strerror}") from exc
    sums: dict[str, str] = {}
    md5 = info / f"{pkg.info_name}.md5sums"
    if md5.exists():
        for n, line in enumerate(md5.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
            parts = line.split(None, 1)
            if len(parts) != 2 or len(parts[0]) != 32:
                raise MeasureDBError(f"{md5}:{n}: not an md5sums line")
            sums["/" + parts[1].lstrip("/")] = parts[0]
    return [p for p in paths if p and p != "/."], sums
