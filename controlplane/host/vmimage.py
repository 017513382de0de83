"""`cwlite vm image`: a Build VM's root disk image, Debian's packages and cwlite's own, for `vm up --disk`.

The image is built without loop mounts or a VM, as root on the host:
  1. `debootstrap --variant=minbase SUITE` into a tree under the data dir
     (`<data>/vm-images/NAME.tree`), then in a chroot `apt-get install` of the
     base set: cwlite's Debian package's dependencies (Python, bcc), the guest
     kernel's headers (`linux-headers-RELEASE`: bcc compiles against them in the
     guest), iproute2, the TPM device TCTI and the workload's packages (distcc).
     Services are kept from starting in the chroot (`policy-rc.d` exits 101).
     The tree is kept: the next build with the same suite, mirrors, release and
     packages starts here (the marker file `.cwlite-base.json` says with what).
  2. the cwlite package installed again (every build: the package may have
     changed with the same version), a check that the image's Python imports
     what cwlite loads first (bcc, tpm2-pytss, cext), the mount point the VM's
     policy and DB appear at.
  3. optionally the VM's measurement DB, from the tree's own dpkg database and
     files (prima.sources.build with `dpkg_root`): the image's code, not the host's.
  4. `mkfs.ext4 -d TREE IMAGE`: the tree becomes an ext4 image (sparse file).
`vm up --disk IMAGE` measures the image's SHA-256 as the VM's fifth boot part.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from controlplane.core.errors import VmError
from controlplane.host.vmv import GUEST_SHARE
from prima.sources import build as build_db

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# what cwlite's guest side needs beside its package's own dependencies (which include bpftool and the TCTI for
# /dev/tpmrm0): `ip` for guest-init's network, and udev (with kmod) to load the modules Debian's kernel has the
# NIC's driver in (virtio_net is a module; virtme-ng's init runs the image's udevd as it runs the host's)
BASE_PACKAGES = ("iproute2", "udev", "kmod")
WORKLOAD_PACKAGES = ("distcc",)
MARKER = ".cwlite-base.json"
IMAGE_LABEL = "cwlite-root"
_IN_CHROOT_DEB = "/tmp/cwlite.deb"
BUNDLED = "/usr/lib/cwlite/python"      # the package's bundled Python dependencies (packaging/cwlite.sh)
_SMOKE = "import bcc, tpm2_pytss, tpm2_pytss.ESAPI, cext, controlplane.cli.main"
_HEADROOM = 1.25                        # ext4's metadata and some free space beyond the files' blocks
_MIN_FREE = 256 << 20
_STEP_TIMEOUT = 3600.0
# progress lines of debootstrap worth passing on (one per phase, not one per package)
_PHASES = ("I: Retrieving Release", "I: Resolving", "I: Found", "I: Checking", "I: Base system", "I: Configuring helper",
           "I: Installing core", "I: Unpacking the base", "I: Configuring the base")


@dataclass(frozen=True)
class ImageSpec:
    """What goes into the image: the base (cached as a tree) and the cwlite package installed on it each build."""

    deb: Path                               # cwlite's Debian package (`make deb`)
    kernel_release: str                     # the guest kernel's `uname -r`: its headers go in
    packages: tuple[str, ...] = WORKLOAD_PACKAGES
    suite: str = SUITE
    mirror: str = MIRROR
    security_mirror: str = SECURITY_MIRROR
    base_packages: tuple[str, ...] = field(default=BASE_PACKAGES)

    def base(self) -> dict:
        """The tree's identity: what step 1 made it from (the package file is installed per build, not here)."""
        d = asdict(self)
        d.pop("deb")
        d["packages"], d["base_packages"] = list(self.packages), list(self.base_packages)
        return d

    def apt_packages(self) -> list[str]:
        return [*self.base_packages, f"linux-headers-{self.kernel_release}", *self.packages]


def kernel_release(kernel: Path) -> str:
    """The release (`uname -r`) of an x86 bzImage, read from the image: its setup header's kernel_version
    pointer (boot protocol >= 2.00, at 0x20E, relative to 0x200) names the version string."""
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x8000)
    except OSError as exc:
        raise VmError(f"{kernel}: cannot read the kernel image: {exc.strerror}", reason="usage") from exc
    off = int.from_bytes(head[0x20E:0x210], "little") + 0x200 if head[0x202:0x206] == b"HdrS" else len(head)
    end = head.find(b"\0", off)
    if off >= len(head) or end < 0:
        raise VmError(f"{kernel}: not an x86 bzImage (no setup header with a kernel version)", reason="usage")
    return head[off:end].split(b" ", 1)[0].decode(errors="replace")


def _run(argv: Sequence[str], what: str, say: Callable[[str], None], *, keep: Callable[[str], bool] = lambda _l: False,
         env: dict[str, str] | None = None) -> None:
    """Run one build step, passing on the output lines `keep` picks; VmError with the output's tail on failure."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=env)
    except OSError as exc:
        raise VmError(f"{what}: cannot run {argv[0]}: {exc.strerror} (apt-get install debootstrap e2fsprogs)",
                      reason="image") from exc
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-8:]
        if keep(line):
            say(f"  {line}")
    try:
        rc = proc.wait(_STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    if rc != 0:
        raise VmError(f"{what}: {argv[0]} exited {rc}: {' | '.join(tail)}", reason="image")


def _chroot_env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
            "HOME": "/root"}


@contextlib.contextmanager
def _no_services(tree: Path) -> Iterator[None]:
    """No service starts in the chroot while packages are installed (distcc's postinst would start distccd on
    the HOST's network): invoke-rc.d asks policy-rc.d, which says no (101). Removed after: the image is a product."""
    rc_d = tree / "usr/sbin/policy-rc.d"
    rc_d.write_text("#!/bin/sh\n# cwlite vm image: no service starts while the image is built\nexit 101\n")
    rc_d.chmod(0o755)
    try:
        yield
    finally:
        rc_d.unlink()


def _make_base(tree: Path, spec: ImageSpec, say: Callable[[str], None]) -> None:
    """Step 1: debootstrap and the base packages, with the cwlite package's dependencies (installed through apt
    once here, so the per-build reinstall finds them)."""
    if tree.exists():
        shutil.rmtree(tree)
    tree.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    say(f"debootstrap {spec.suite} (minbase) from {spec.mirror} into {tree}")
    _run(["debootstrap", "--variant=minbase", spec.suite, str(tree), spec.mirror], "debootstrap", say,
         keep=lambda line: line.startswith(_PHASES))
    (tree / "etc/apt/sources.list").write_text(
        f"deb {spec.mirror} {spec.suite} main\ndeb {spec.mirror} {spec.suite}-updates main\n"
        f"deb {spec.security_mirror} {spec.suite}-security main\n")
    shutil.copyfile(spec.deb, tree / _IN_CHROOT_DEB.lstrip("/"))
    say("apt-get update in the image")
    _run(["chroot", str(tree), "apt-get", "update", "-q"], "apt-get update", say, env=_chroot_env())
    wanted = spec.apt_packages()
    say(f"apt-get install in the image: {' '.join(wanted)} and {spec.deb.name}'s dependencies")
    with _no_services(tree):
        _run(["chroot", str(tree), "apt-get", "install", "-y", "-q", "--no-install-recommends", *wanted,
              _IN_CHROOT_DEB], "apt-get install", say,
             keep=lambda line: line.startswith(("Need to get", "After this operation")), env=_chroot_env())
    _run(["chroot", str(tree), "apt-get", "clean"], "apt-get clean", say, env=_chroot_env())
    (tree / MARKER).write_text(json.dumps(spec.base(), sort_keys=True))


def _tree_size(tree: Path) -> tuple[int, int]:
    """The tree's allocated bytes and its inodes (hard links once): what the ext4 image must hold."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total, len(seen) + 1


def build_image(out: Path, spec: ImageSpec, data_dir: Path, *, db: Path | None = None, trust_set: str = "build",
                say: Callable[[str], None] = print) -> dict:
    """Build the root disk image `out` (see the module docstring); with `db`, the VM's measurement DB trusting
    `spec.packages` and their dependencies as the image holds them. The image's facts."""
    if not spec.deb.is_file():
        raise VmError(f"{spec.deb}: no such package file (`make deb` builds build/deb/cwlite_*_amd64.deb)",
                      reason="usage")
    if os.geteuid() != 0:
        raise VmError("cwlite vm image: run as root (debootstrap, chroot and the files' owners need it)",
                      reason="usage")
    out = out.resolve()
    tree = Path(data_dir).resolve() / "vm-images" / f"{out.name}.tree"
    try:
        cached = json.loads((tree / MARKER).read_text()) == spec.base()
    except (OSError, ValueError):
        cached = False
    if cached:
        say(f"base tree {tree}: reused (same suite, mirrors, kernel headers and packages)")
    else:
        _make_base(tree, spec, say)
    say(f"installing {spec.deb.name} in the image (again: the same version may have changed)")
    shutil.copyfile(spec.deb, tree / _IN_CHROOT_DEB.lstrip("/"))
    with _no_services(tree):        # apt, not dpkg -i: a package that gained a dependency gets it
        _run(["chroot", str(tree), "apt-get", "install", "-y", "-q", "--no-install-recommends", "--reinstall",
              _IN_CHROOT_DEB], "apt-get install cwlite", say, env=_chroot_env())
    (tree / _IN_CHROOT_DEB.lstrip("/")).unlink()
    # what the guest's cwlite loads first, before a VM boot finds it missing: bcc, the TSS (tpm2-pytss and the
    # libraries it links), cext (libbpf)
    say("checking the image's cwlite: python3 imports bcc, tpm2_pytss, cext, the CLI")
    _run(["chroot", str(tree), "/usr/bin/python3", "-c", _SMOKE], "the image's cwlite", say,
         env=_chroot_env() | {"PYTHONPATH": BUNDLED})
    (tree / GUEST_SHARE.lstrip("/")).mkdir(parents=True, exist_ok=True, mode=0o755)
    facts: dict = {"image": str(out), "tree": str(tree), "kernel_release": spec.kernel_release,
                   "packages": list(spec.packages)}
    if db is not None:
        say(f"measurement DB {db}: {', '.join(spec.packages)} and their dependencies, from the image's files")
        result = build_db(db, from_dpkg=list(spec.packages), trust_set=trust_set, dpkg_admindir=tree / "var/lib/dpkg",
                          dpkg_root=tree, note=f"the Build VM image {out.name}")
        facts["db"] = {"path": str(db), "trust_set": trust_set, "measured": result.measured,
                       "untrusted": result.untrusted}
    used, inodes = _tree_size(tree)
    size = max(int(used * _HEADROOM), used + _MIN_FREE)
    size -= size % 4096
    inodes = int(inodes * _HEADROOM) + 1024         # mke2fs's default ratio is too few for a tree of small files
    say(f"mkfs.ext4 -d {tree} {out} ({size >> 20} MiB sparse, {inodes} inodes)")
    tmp = out.with_name(out.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with open(tmp, "wb") as f:
        f.truncate(size)
    _run(["mkfs.ext4", "-q", "-F", "-L", IMAGE_LABEL, "-N", str(inodes), "-d", str(tree), str(tmp)], "mkfs.ext4", say)
    os.replace(tmp, out)
    facts["bytes"] = size
    return facts
