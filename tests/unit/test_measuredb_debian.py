"""Debian as a source of trust: real .debs checked back to apt's signed InRelease; dpkg with md5sums.

The .debs come from the Debian archive (`apt-get download`, once per session);
the indexes and signatures are apt's own under /var/lib/apt/lists. Tampering
is done on copies in tmp dirs; no system file is modified.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from controlplane.core.errors import MeasureDBError
from prima import debian
from prima import measure
from prima.kernelview import kernel_dev, kernel_view
from prima.measuredb import MeasureDB
from prima.sources import build

LISTS = debian.LISTS_DIR
PACKAGES = ("coreutils", "distcc")


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coreutils and distcc .debs as apt-get downloads them (cached for the session)."""
    d = tmp_path_factory.mktemp("debs")
    os.chmod(d, 0o755)
    proc = subprocess.run(["apt-get", "download", "-q", *PACKAGES], cwd=d, capture_output=True, text=True)
    assert proc.returncode == 0, f"apt-get download failed: {proc.stderr.strip()}"
    assert len(list(d.glob("*.deb"))) == len(PACKAGES)
    return d


def _main_lists(tmp: Path) -> Path:
    """A lists dir holding bookworm's signed InRelease and its amd64 main Packages (copies)."""
    lists = tmp / "lists"
    lists.mkdir()
    (inrelease,) = [p for p in LISTS.glob("*_dists_bookworm_InRelease")]
    shutil.copy2(inrelease, lists)
    for pk in LISTS.glob(inrelease.name.removesuffix("InRelease") + "main_binary-amd64_Packages*"):
        shutil.copy2(pk, lists)
    return lists


def _deb(debs: Path, name: str) -> Path:
    (p,) = debs.glob(f"{name}_*.deb")
    return p


def test_debs_build_with_origin_package_and_version(debs: Path, tmp_path: Path) -> None:
    result = build(tmp_path / "m.db", from_deb=[debs], trust_set="tools", note="apt-get download")
    assert result.untrusted == 0 and result.measured > 100
    with MeasureDB.open(tmp_path / "m.db") as db:
        rows = db.measurements("tools")
        assert {m.package for m in rows} == set(PACKAGES)
        coreutils_version = _deb(debs, "coreutils").name.split("_")[1]
        ls = [m for m in rows if m.path == "/bin/ls"]
        assert [(m.origin, m.package, m.version) for m in ls] == [("deb", "coreutils", coreutils_version)]
        # The archive's /bin/ls is this machine's /usr/bin/ls when the installed coreutils is that version.
        if subprocess.run(["dpkg-query", "-W", "-f=${Version}", "coreutils"], capture_output=True, text=True).stdout == coreutils_version:
            assert db.is_trusted(measure.measure_file("/usr/bin/ls").sha256, "tools")
            st = os.stat("/usr/bin/ls")  # merged /usr: the archive's /bin/ls is this inode
            view = {(e.dev, e.ino): e for e in kernel_view(db, ["tools"])}
            assert view[(kernel_dev(st.st_dev), st.st_ino)].path in ("/bin/ls", "/usr/bin/ls")
        assert any(m.path == "/usr/bin/distccd" for m in rows)
        # update-distcc-symlinks is a #! perl script: it counts as code, with its interpreter.
        assert [m.origin for m in rows if m.path == "/usr/sbin/update-distcc-symlinks"] == ["deb"]
        assert "/usr/share/doc/distcc/README" not in {m.path for m in rows}


def test_tampered_packages_line_is_refused(debs: Path, tmp_path: Path) -> None:
    lists = _main_lists(tmp_path)
    (compressed,) = lists.glob("*_Packages.*")
    text = subprocess.run([debian.APT_HELPER, "cat-file", str(compressed)], capture_output=True, check=True).stdout
    real = hashlib.sha256(_deb(debs, "coreutils").read_bytes()).hexdigest().encode()
    assert text.count(b"SHA256: " + real) == 1
    plain = lists / compressed.name.removesuffix(compressed.suffix)
    plain.write_bytes(text.replace(b"SHA256: " + real, b"SHA256: " + b"0" * 64))
    compressed.unlink()
    with pytest.raises(MeasureDBError) as info:
        build(tmp_path / "m.db", from_deb=[debs], trust_set="tools", lists_dir=lists)
    msg = str(info.value)
    assert msg.startswith(f"{plain}: SHA256 ") and "differs from deb.debian.org_debian_dists_bookworm_InRelease" in msg
    assert "main/binary-amd64/Packages" in msg and "\n" not in msg
    assert not (tmp_path / "m.db").exists() or MeasureDB.open(tmp_path / "m.db").trust_sets() == []


def test_tampered_and_truncated_deb_are_refused(debs: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    src = _deb(debs, "coreutils")
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / src.name).write_bytes(bytes(data))
    with pytest.raises(MeasureDBError, match=rf"^{bad / src.name}: SHA256 [0-9a-f]{{64}} differs from Packages \(.*_Packages(\.lz4)? coreutils "):
        build(tmp_path / "m.db", from_deb=[bad], trust_set="tools", lists_dir=_main_lists(tmp_path))
    (bad / src.name).write_bytes(src.read_bytes()[:5000])
    with pytest.raises(MeasureDBError, match=rf"^{bad / src.name}: Size 5000 differs from Packages \("):
        build(tmp_path / "m.db", from_deb=[bad], trust_set="tools")
    (bad / src.name).unlink()
    (bad / "renamed.deb").write_bytes(src.read_bytes()[:5000])
    with pytest.raises(MeasureDBError, match=r"renamed\.deb: SHA256 [0-9a-f]{64} is in no verified Packages index"):
        build(tmp_path / "m.db", from_deb=[bad], trust_set="tools")


def test_bad_inrelease_signature_is_refused(debs: Path, tmp_path: Path) -> None:
    lists = _main_lists(tmp_path)
    (inrelease,) = lists.glob("*_InRelease")
    text = bytearray(inrelease.read_bytes())
    at = text.index(b"Codename: bookworm") + len("Codename: bookwor")
    text[at] ^= 0x01  # one flipped bit inside the signed text
    inrelease.write_bytes(bytes(text))
    with pytest.raises(MeasureDBError, match=rf"^{inrelease}: signature: BAD signature"):
        build(tmp_path / "m.db", from_deb=[debs], trust_set="tools", lists_dir=lists)


def test_inrelease_signed_by_an_untrusted_key_is_not_used(debs: Path, tmp_path: Path) -> None:
    lists = _main_lists(tmp_path)
    other = tmp_path / "other.gpg"
    shutil.copy2("/usr/share/keyrings/debian-archive-removed-keys.gpg", other)
    with pytest.raises(MeasureDBError, match=r"coreutils_.*\.deb: SHA256 [0-9a-f]{64} is in no verified Packages index "
                       r"\(0 checked; not used: deb\.debian\.org_debian_dists_bookworm_InRelease: no signature by a trusted key\)$"):
        build(tmp_path / "m.db", from_deb=[debs], trust_set="tools", lists_dir=lists, keyrings=[other])
    # The armored keyrings of /etc/apt/trusted.gpg.d verify it alone.
    ascs = sorted(debian.TRUSTED_GPG_D.glob("*.asc"))
    assert debian.verify_inrelease(next(lists.glob("*_InRelease")), ascs).startswith("Origin: Debian")


def test_dpkg_refuses_a_modified_copy_of_an_installed_binary(tmp_path: Path) -> None:
    """Build coreutils from dpkg's records, reading the files from a copy with one binary altered."""
    root = tmp_path / "root"
    info = debian.installed_packages(["coreutils"], deps=False)
    paths, sums = debian.dpkg_files(info[0])
    copied = 0
    for p in paths:
        src = Path(p)
        if src.is_file() and not src.is_symlink() and measure.classify(src.read_bytes()[:256]):
            dst = root / p.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied += 1
    assert copied > 50
    altered = root / "bin" / "true"
    with open(altered, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = build(tmp_path / "m.db", from_dpkg=["coreutils"], deps=False, dpkg_root=root, trust_set="core")
    assert result.untrusted == 1 and result.measured == copied
    with MeasureDB.open(tmp_path / "m.db") as db:
        bad = measure.measure_file(altered).sha256
        assert not db.is_trusted(bad, "core")
        assert db.lookup(bad) == []  # not a trusted origin; kept only to say why
        (o,) = db.lookup(bad, include_untrusted=True)
        assert (o.origin, o.package, o.path) == ("dpkg", "coreutils", "/bin/true")
        assert o.untrusted == f"md5sums mismatch (dpkg: {sums['/bin/true']}, file: {hashlib.md5(altered.read_bytes()).hexdigest()})"
        assert db.is_trusted(measure.measure_file(root / "bin" / "ls").sha256, "core")
        assert bad not in {e.digest for e in kernel_view(db, ["core"])}


def test_dpkg_resolves_dependencies_from_package_metadata(tmp_path: Path) -> None:
    names = {p.package for p in debian.installed_packages(["gcc", "make"])}
    assert {"gcc", "gcc-12", "cpp", "binutils", "libc6", "make"} <= names
    assert {p.package for p in debian.installed_packages(["gcc"], deps=False)} == {"gcc"}
    with pytest.raises(MeasureDBError, match=r"^/var/lib/dpkg/status: package no-such-pkg: not installed$"):
        debian.installed_packages(["no-such-pkg"])


def test_dpkg_build_on_this_machine_marks_conffiles_untrusted(tmp_path: Path) -> None:
    result = build(tmp_path / "m.db", from_dpkg=["distcc"], deps=False, trust_set="distcc")
    with MeasureDB.open(tmp_path / "m.db") as db:
        rows = {m.path: m for m in db.measurements("distcc")}
        assert rows["/usr/bin/distccd"].untrusted == "" and db.is_trusted(rows["/usr/bin/distccd"].digest, "distcc")
        # /etc/init.d/distcc is a conffile: dpkg keeps no md5sums line for it, so it is not trusted.
        assert rows["/etc/init.d/distcc"].untrusted.startswith("no md5sums entry")
    assert result.untrusted >= 1


def test_deb_trust_set_takes_named_packages_and_needs_their_dependencies(debs: Path, tmp_path: Path) -> None:
    only = build(tmp_path / "m.db", from_deb=[debs], deb_packages=["distcc"], deps=False, trust_set="distcc")
    with MeasureDB.open(tmp_path / "m.db") as db:
        assert {m.package for m in db.measurements("distcc")} == {"distcc"} and only.measured > 0
    # With dependencies (from the verified Packages stanza), each must have its .deb here: fail closed.
    with pytest.raises(MeasureDBError, match=rf"^{debs}: package distcc: Depends [a-z0-9.+-]+( \| [a-z0-9.+-]+)*: no verified \.deb here$"):
        build(tmp_path / "m.db", from_deb=[debs], deb_packages=["distcc"], trust_set="distcc")
    with pytest.raises(MeasureDBError, match=rf"^{debs}: package gcc: no verified \.deb here$"):
        build(tmp_path / "m.db", from_deb=[debs], deb_packages=["gcc"], trust_set="x")


def _own_archive(tmp: Path, deb: Path, valid_until: str) -> tuple[Path, Path]:
    """A lists dir signed by a key made here: InRelease (with Valid-Until) -> Packages listing `deb`."""
    from debian.deb822 import Packages

    home = tmp / "gnupg"
    home.mkdir(mode=0o700, parents=True)
    env = {**os.environ, "GNUPGHOME": str(home)}
    gpg = ["gpg", "--batch", "--quiet", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "cwlite test archive <test@example.invalid>", "ed25519", "sign", "never"], env=env, check=True)
    keyring = tmp / "archive.gpg"
    keyring.write_bytes(subprocess.run([*gpg, "--export"], env=env, check=True, capture_output=True).stdout)
    stanza = Packages(subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout)
    stanza["Filename"] = f"pool/main/{deb.name}"
    stanza["Size"] = str(deb.stat().st_size)
    stanza["SHA256"] = hashlib.sha256(deb.read_bytes()).hexdigest()
    packages = (stanza.dump() + "\n").encode()
    release = (
        "Origin: cwlite-test\nSuite: test\nDate: Thu, 01 Jan 2026 00:00:00 UTC\n"
        f"Valid-Until: {valid_until}\nSHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} main/binary-amd64/Packages\n"
    )
    lists = tmp / "lists"
    lists.mkdir()
    (lists / "example.invalid_dists_test_main_binary-amd64_Packages").write_bytes(packages)
    signed = subprocess.run([*gpg, "--clearsign", "--digest-algo", "SHA256"], input=release.encode(), env=env, check=True, capture_output=True).stdout
    (lists / "example.invalid_dists_test_InRelease").write_bytes(signed)
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=True)  # gpg started it; leave no daemon
    return lists, keyring


def test_own_signed_archive_and_valid_until(debs: Path, tmp_path: Path) -> None:
    """A whole chain from a key made here; an InRelease past its Valid-Until is not used (a replayed old index)."""
    one = tmp_path / "one"
    one.mkdir()
    deb = Path(shutil.copy2(_deb(debs, "distcc"), one))
    lists, keyring = _own_archive(tmp_path / "fresh", deb, "Fri, 01 Jan 2100 00:00:00 UTC")
    result = build(tmp_path / "m.db", from_deb=[one], trust_set="t", lists_dir=lists, keyrings=[keyring])
    assert result.measured > 0 and result.untrusted == 0
    lists, keyring = _own_archive(tmp_path / "stale", deb, "Wed, 01 Jan 2025 00:00:00 UTC")
    with pytest.raises(MeasureDBError, match=r"is in no verified Packages index \(0 checked; not used: "
                       r"example\.invalid_dists_test_InRelease: Valid-Until Wed, 01 Jan 2025 00:00:00 UTC has passed\)$"):
        build(tmp_path / "m.db", from_deb=[one], trust_set="t", lists_dir=lists, keyrings=[keyring])
