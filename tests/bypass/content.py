"""What was measured is what runs (issue 20): attacks that change a trusted file's bytes without
changing its (dev, ino, ctime), written once for both backends.

`ContentScenarios` is part of the bypass suite (BypassScenarios inherits it), so each tier runs
it with its backend: the tracepoint backend kills (status 137), the lsm backend denies (EPERM).
The attacker is this (unlabelled, root) test process. The helpers (mounts, a shared writable
mapping, a stat-invisible patch) also serve the measurement DB's tests and the e2e proof test.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from controlplane.core.events import EventKind
from prima import measure
from tests.bypass.backend import Backend
from tests.bypass.lab import Lab
from tests.conftest import requires

TAINTED = "write-enabled-since-measurement"
WRITERS = "open-for-write"
LAYER = "overlay-layer-untrusted"


# ---- the attacker's tools ---------------------------------------------------------------------

@contextlib.contextmanager
def mounted(*args: str) -> Iterator[None]:
    """mount ARGS... for the block; lazily unmounted after."""
    subprocess.run(["mount", *args], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", args[-1]], check=False)


@contextlib.contextmanager
def tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    with mounted("-t", "tmpfs", "-o", "size=32m", "cwlite-content", str(where)):
        yield where


@contextlib.contextmanager
def ext4(where: Path) -> Iterator[Path]:
    """A fresh ext4 on a loop device backed by an image file the test owns."""
    image = where.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    where.mkdir(exist_ok=True)
    probe = subprocess.run(["mount", "-o", "loop", str(image), str(where)], capture_output=True, text=True)
    if probe.returncode != 0:  # the VM tier's guest refuses loop-backed block mounts (EPERM)
        pytest.skip(f"cannot mount a loop-backed ext4 here: {probe.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def stat_key(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@contextlib.contextmanager
def shared_mapping(path: Path) -> Iterator[mmap.mmap]:
    """A MAP_SHARED writable mapping of `path`, every page faulted in by a read first: on
    tmpfs (no page_mkwrite) the pages are then mapped writable and later writes never fault."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
        hashlib.sha256(m).digest()
        yield m


def patch(m: mmap.mmap) -> None:
    """Change the last byte (in the section header table: the program still runs)."""
    m[len(m) - 1] = m[len(m) - 1] ^ 0x01


def sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def patch_stat_invisibly(path: Path) -> bytes:
    """Patch `path` through a shared mapping (tmpfs); returns the new digest. Asserts the stat did not change."""
    before = stat_key(path)
    with shared_mapping(path) as m:
        patch(m)
    assert stat_key(path) == before, "the patch changed the stat: not the attack this tests"
    return sha256(path)


def tool_copy(where: Path) -> Path:
    """A copy of /usr/bin/true at `where`/tool (a new inode: trusted only once measured)."""
    tool = where / "tool"
    shutil.copy2("/usr/bin/true", tool)
    return tool




def rewrite_last_byte(path: Path) -> None:
    """A plain write(2) of one changed byte (the ctime says so)."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))


class ContentScenarios:
    """Loads of a trusted file whose bytes may differ from its measurement, against the class's `backend`
    (the `lab` fixture is BypassScenarios')."""

    backend: Backend

    def refused(self, r: subprocess.CompletedProcess, if_denied: int, what: str) -> None:
        """`r` ran `<load>; echo rc=$?` in a TP shell: the load was stopped (`if_denied`: the caller's
        status on a denied call: 126 the shell's exec, 3 the helper's)."""
        assert r.stdout.split()[-1:] == [self.backend.expect.rc(if_denied)], f"{what}: {r.stdout!r} {r.stderr!r}"
        self.backend.expect.reported(r.stderr)

    def _tmpfs_patch_then_load(self, lab: Lab, tmp_path: Path, load: str, op: str, if_denied: int) -> None:
        """Measure a tool on tmpfs, load it the way `load` says ({tool}, {helper}), patch it through
        MAP_SHARED (ctime never changes on tmpfs), load it again: refused, why = the taint."""
        with tmpfs(tmp_path / "t") as mnt:
            tool = tool_copy(mnt)
            cmd = load.format(tool=tool, helper=lab.helper)
            tp = lab.label(trusted=[str(tool)])
            assert tp.sh(f"{cmd}; echo rc=$?").stdout.split()[-1:] == ["rc=0"]
            patch_stat_invisibly(tool)
            self.refused(tp.sh(f"{cmd}; echo rc=$?"), if_denied, f"{op} of the patched file")
            [v] = tp.violations(op)
            assert v.detail["why"] == TAINTED and v.detail["action"] == self.backend.expect.action
            assert v.detail["ino"] == os.stat(tool).st_ino

    def test_tmpfs_shared_patch_then_exec(self, lab: Lab, tmp_path: Path) -> None:
        """Patched through MAP_SHARED after measurement: the TP's exec is refused."""
        self._tmpfs_patch_then_load(lab, tmp_path, "{tool}", "exec", 126)

    def test_tmpfs_shared_patch_then_mmap_exec(self, lab: Lab, tmp_path: Path) -> None:
        """The same patch, then the TP maps the file PROT_EXEC: refused at the mapping."""
        self._tmpfs_patch_then_load(lab, tmp_path, "{helper} mmap {tool}", "mmap", 3)

    @requires(tool="mkfs.ext4")
    def test_ext4_dirty_before_measure_then_patch(self, lab: Lab, tmp_path: Path) -> None:
        """ext4: a page dirtied through a shared mapping before measurement takes later writes through
        the same mapping without a ctime change. The measurement sees the writer and leaves the file
        out, so after the patch (and the writer gone) the TP's exec is refused as unmeasured."""
        with ext4(tmp_path / "e") as mnt:
            tool = tool_copy(mnt)
            with shared_mapping(tool) as m:
                m[len(m) - 1] = m[len(m) - 1]  # dirty the page: the write fault stamps the ctime now
                dirty = stat_key(tool)
                assert measure.has_writers(tool)
                tp = lab.label(trusted=[str(tool)])
                assert (os.stat(tool).st_ino, os.stat(tool).st_ctime_ns) not in {
                    (e.ino, e.ctime_ns) for e in lab.last_entries}
                patch(m)  # the page is still dirty and writable: no fault, no stamp
                assert stat_key(tool) == dirty
            self.refused(tp.sh(f"{tool}; echo rc=$?"), 126, "exec of the file patched through a dirty mapping")
            [v] = tp.violations("exec")
            assert v.detail["why"] == "unmeasured" and v.detail["ino"] == os.stat(tool).st_ino

    def test_writer_holds_the_file_open(self, lab: Lab, tmp_path: Path) -> None:
        """Opened for write after measurement and held: the kernel refuses the exec itself (ETXTBSY),
        and a TP's executable mapping of it is refused as open for write."""
        tool = tool_copy(tmp_path)
        tp = lab.label(trusted=[str(tool)])
        assert tp.sh(f"{tool}; echo rc=$?").stdout.strip() == "rc=0"
        with open(tool, "r+b"):
            r = tp.sh(f"{tool}; echo rc=$?")
            assert r.stdout.strip() != "rc=0", r
            if os.strerror(errno.ETXTBSY) not in r.stderr:  # a kernel that lets a written file be exec'd
                self.refused(r, 126, "exec of a file open for write")
            self.refused(tp.sh(f"{lab.helper} mmap {tool}; echo rc=$?"), 3, "mmap(PROT_EXEC) of a file open for write")
            [v] = tp.violations("mmap")
            assert v.detail["why"] == WRITERS and v.detail["action"] == self.backend.expect.action

    def test_rewritten_closed_and_remeasured_is_trusted(self, lab: Lab, tmp_path: Path) -> None:
        """No false alarm: once a patched file is measured again, the TP runs it, and the log carries
        the digest of the bytes that now run."""
        with tmpfs(tmp_path / "t") as mnt:
            tool = tool_copy(mnt)
            tp = lab.label(trusted=[str(tool)])
            new = patch_stat_invisibly(tool)
            self.refused(tp.sh(f"{tool}; echo rc=$?"), 126, "exec of the patched file")
            again = lab.label(trusted=[str(tool)])
            assert again.sh(f"{tool}; {lab.helper} mmap {tool}; echo rc=$?").stdout.split() == ["mapped", "rc=0"]
            loads = [e for e in again.events(EventKind.TRUSTED_LOAD) if e.detail["ino"] == os.stat(tool).st_ino]
            assert loads and {e.digest for e in loads} == {new}
            assert not again.violations(timeout=0.3)
        # a plain write(2) and close: the ctime says so; measured again, trusted again
        tool = tool_copy(tmp_path)
        tp = lab.label(trusted=[str(tool)])
        rewrite_last_byte(tool)
        self.refused(tp.sh(f"{tool}; echo rc=$?"), 126, "exec of the rewritten file")
        assert tp.violations("exec")[0].detail["why"] in ("changed-after-measurement", TAINTED)
        again = lab.label(trusted=[str(tool)])
        assert again.sh(f"{tool}; echo rc=$?").stdout.strip() == "rc=0"
        assert not again.violations(timeout=0.3)

    def test_overlay_over_two_file_systems_entrypoint(self, lab: Lab, tmp_path: Path) -> None:
        """An entrypoint on an overlay whose layers are two file systems (virtme-ng's tmpfs over the VM's 9p
        root, issue 25): stat() gives the layer's pseudo device, exec sees the overlay's inode; the label is
        entered. Mounted over its own lower dir (virtme-ng's layout), the layer file has no path left to be
        measured by: the entrypoint is a violation (overlay-layer-untrusted) and nothing enters the label."""
        with tmpfs(tmp_path / "lo") as lower, tmpfs(tmp_path / "up") as up:
            shutil.copy2("/bin/sh", lower / "ep")
            for d in ("u", "w", "merged"):
                (up / d).mkdir()
            opts = f"xino=off,lowerdir={lower},upperdir={up / 'u'},workdir={up / 'w'}"
            with mounted("-t", "overlay", "cwlite-content", "-o", opts, str(up / "merged")):
                ep = up / "merged" / "ep"
                assert os.stat(ep).st_dev != os.stat(up / "merged").st_dev       # the layer's pseudo device
                tp = lab.label(entrypoint=str(ep), trusted=[str(lower / "ep")])  # the overlay file, the layer's
                assert tp.sh("echo in; exit 0").stdout.strip() == "in"
                [enter] = tp.events(EventKind.LABEL_TRANSITION)
                assert enter.subject == str(ep) and enter.detail["ino"] == os.stat(ep).st_ino
                assert not tp.violations(timeout=0.3)
            with mounted("-t", "overlay", "cwlite-content", "-o", opts, str(lower)):
                tp = lab.label(entrypoint=str(lower / "ep"))      # all a path can reach: the overlay's inode
                assert tp.sh("echo ran; exit 0").stdout.strip() == "ran"     # unlabelled: nothing to stop
                [v] = tp.violations("entrypoint")
                assert v.detail["why"] == LAYER and v.detail["action"] == "allowed"
                assert not tp.events(EventKind.LABEL_TRANSITION, timeout=0.2)

    def test_overlay_lower_layer_rewrite(self, lab: Lab, tmp_path: Path) -> None:
        """The lower layer's file is rewritten directly: exec through the overlay is keyed by the overlay
        inode, whose cached ctime is stale; the layer inode it shows is judged too."""
        with tmpfs(tmp_path / "o") as base:
            lower, upper, work, merged = (base / n for n in ("lower", "upper", "work", "merged"))
            for d in (lower, upper, work, merged):
                d.mkdir()
            tool_copy(lower)
            with mounted("-t", "overlay", "cwlite-content", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                         str(merged)):
                tool = merged / "tool"
                tp = lab.label(trusted=[str(tool), str(lower / "tool")])  # what kernel_view gives: both identities
                assert tp.sh(f"{tool}; echo rc=$?").stdout.strip() == "rc=0"
                rewrite_last_byte(lower / "tool")
                self.refused(tp.sh(f"{tool}; echo rc=$?"), 126, "exec through the overlay of a rewritten lower file")
                [v] = tp.violations("exec")
                assert v.detail["why"] == LAYER and v.detail["action"] == self.backend.expect.action
