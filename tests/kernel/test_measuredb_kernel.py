"""The kernel view's keys equal what a real BPF program reads for an exec'd file.

BPF: probe.bpf.c sched_process_exec records the exec'd image's
cwl_file_identity (super_block.s_dev, i_ino, ctime) per tgid. Checked on the
root filesystem (ext4 here), a tmpfs and an overlayfs mount made for the test.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from ebpf import loader
from controlplane.host.vmv import uncover_host_root
from prima.kernelview import KernelIdentity, kernel_dev, kernel_view
from prima.measuredb import MeasureDB
from prima.sources import build
from tests.conftest import requires

pytestmark = requires(root=True)


@pytest.fixture(scope="module")
def probe():
    bpf = loader.load("probe.bpf.c")
    try:
        yield bpf
    finally:
        bpf.cleanup()


def _exec_identity(bpf, exe: Path) -> tuple[int, int, int]:
    child = subprocess.Popen([str(exe)])
    child.wait()
    table = bpf["cwl_probe_exe"]
    ident = table[table.Key(child.pid)]
    return ident.dev, ident.ino, ident.ctime_ns


@contextlib.contextmanager
def _mount(*args: str) -> Iterator[None]:
    subprocess.run(["mount", *args], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", args[-1]], check=True)


def _view_key(db_path: Path, exe: Path) -> tuple[int, int, int]:
    with MeasureDB.open(db_path) as db:
        (entry,) = [e for e in kernel_view(db, ["t"]) if e.path == str(exe)]
    return entry.dev, entry.ino, entry.ctime_ns


def test_kernel_dev_and_ctime_cookie_match_bpf_on_the_root_fs(probe, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    exe = site / "true-copy"
    shutil.copy2("/usr/bin/true", exe)
    build(tmp_path / "m.db", from_dir=[site], trust_set="t")
    key = _view_key(tmp_path / "m.db", exe)
    assert _exec_identity(probe, exe) == key
    st = os.stat(exe)
    assert key[0] == kernel_dev(st.st_dev)
    if os.major(st.st_dev) != 0:  # a block device: the two encodings differ, and BPF agreed with ours
        assert kernel_dev(st.st_dev) != st.st_dev
    # Written after measurement: the kernel sees a new ctime, and the view drops the file.
    with open(exe, "ab") as f:
        f.write(b"\0")
    seen = _exec_identity(probe, exe)
    assert seen[2] != key[2]
    with MeasureDB.open(tmp_path / "m.db") as db:
        assert seen not in {(e.dev, e.ino, e.ctime_ns) for e in kernel_view(db, ["t"])}


def test_tmpfs_identity_is_its_anonymous_device(probe, tmp_path: Path) -> None:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    with _mount("-t", "tmpfs", "cwlite-test", str(mnt)):
        exe = mnt / "true-copy"
        shutil.copy2("/usr/bin/true", exe)
        build(tmp_path / "m.db", from_dir=[mnt], trust_set="t")
        key = _view_key(tmp_path / "m.db", exe)
        assert os.major(os.stat(exe).st_dev) == 0  # anonymous block device 0:N
        assert _exec_identity(probe, exe) == key


def test_overlay_identity_is_the_overlay_mount_not_the_layer(probe, tmp_path: Path) -> None:
    """exec through an overlay: the kernel sees the overlay's s_dev; the same bytes via the lower dir are another key."""
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    shutil.copy2("/usr/bin/true", lower / "true-copy")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    with _mount("-t", "overlay", "cwlite-test", "-o", opts, str(merged)):
        exe = merged / "true-copy"
        build(tmp_path / "m.db", from_dir=[merged], trust_set="t")
        key = _view_key(tmp_path / "m.db", exe)
        assert _exec_identity(probe, exe) == key
        assert os.major(os.stat(exe).st_dev) == 0
        build(tmp_path / "lower.db", from_dir=[lower], trust_set="t")
        lower_key = _view_key(tmp_path / "lower.db", lower / "true-copy")
        assert lower_key[0] != key[0]  # same content, different device: keyed apart
        assert _exec_identity(probe, lower / "true-copy") == lower_key
        # mmap through the overlay maps the layer's file: the overlay DB's view holds that identity too.
        with MeasureDB.open(tmp_path / "m.db") as db:
            keys = {(e.dev, e.ino, e.ctime_ns): e.path for e in kernel_view(db, ["t"])}
        assert keys == {key: str(exe), lower_key: str(lower / "true-copy")}


@requires(tool="mkfs.btrfs")
def test_btrfs_identity_is_the_superblock_not_the_subvolume(probe, tmp_path: Path) -> None:
    """stat() gives each btrfs subvolume its own anonymous st_dev; the kernel keys on the one s_dev.

    Inode numbers repeat across subvolumes, so two files can share a key: the
    view keeps one, and the other's ctime cookie does not match it (denied, never confused).
    """
    img = tmp_path / "btrfs.img"
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    mnt = tmp_path / "btrfs"
    mnt.mkdir()
    with _mount("-o", "loop", str(img), str(mnt)):
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(mnt / "sub")], check=True, capture_output=True)
        top = Path(shutil.copy2("/usr/bin/true", mnt / "top-true"))
        twin = Path(shutil.copy2("/usr/bin/false", mnt / "sub" / "sub-false"))  # first file of its subvolume
        other = Path(shutil.copy2("/usr/bin/true", mnt / "sub" / "sub-true"))
        assert os.stat(top).st_ino == os.stat(twin).st_ino and os.stat(top).st_dev != os.stat(twin).st_dev
        build(tmp_path / "m.db", from_dir=[mnt], trust_set="t")
        with MeasureDB.open(tmp_path / "m.db") as db:
            view = {(e.dev, e.ino, e.ctime_ns) for e in kernel_view(db, ["t"])}
        seen = {p.name: _exec_identity(probe, p) for p in (top, twin, other)}
        assert seen["sub-true"] in view
        assert kernel_dev(os.stat(other).st_dev) != seen["sub-true"][0]  # st_dev alone would have missed it
        assert seen["top-true"][:2] == seen["sub-false"][:2]  # one key, two files
        assert len({seen["top-true"], seen["sub-false"]} & view) == 1


def test_overlay_over_two_file_systems_keys_the_overlay_inode(probe, tmp_path: Path) -> None:
    """stat() through a two-filesystem overlay gives the layer's pseudo device: the kernel (and so the
    entrypoint map) must key the overlay's s_dev with the layer's inode number (KernelIdentity.key)."""
    lower, scratch, merged = tmp_path / "lower", tmp_path / "scratch", tmp_path / "merged"
    for d in (lower, scratch, merged):
        d.mkdir()
    with _mount("-t", "tmpfs", "cwlite-lower", str(lower)), _mount("-t", "tmpfs", "cwlite-upper", str(scratch)):
        shutil.copy2("/usr/bin/true", lower / "true-copy")
        (scratch / "upper").mkdir()
        (scratch / "work").mkdir()
        opts = f"xino=off,lowerdir={lower},upperdir={scratch / 'upper'},workdir={scratch / 'work'}"
        with _mount("-t", "overlay", "cwlite-test", "-o", opts, str(merged)):
            exe = merged / "true-copy"
            seen = _exec_identity(probe, exe)
            st = os.stat(exe)
            assert KernelIdentity().key(str(exe)) == seen[:2]
            assert kernel_dev(st.st_dev) != seen[0]          # the pseudo device: an entrypoint keyed by it is missed
            assert st.st_ino == seen[1]
            build(tmp_path / "m.db", from_dir=[merged], trust_set="t")
            with MeasureDB.open(tmp_path / "m.db") as db:
                keys = {(e.dev, e.ino, e.ctime_ns) for e in kernel_view(db, ["t"])}
            assert seen in keys                                  # the overlay inode, and the layer it shows:
            assert _exec_identity(probe, lower / "true-copy") in keys


def test_an_overlay_over_its_own_lower_dir_hides_the_layer(probe, tmp_path: Path) -> None:
    """virtme-ng's `lowerdir=/usr` on /usr: the layer's files have no path left, so the view holds only the
    overlay inode (the kernel then finds the layer untrusted: fail closed), and uncover_host_root takes the
    overlay away so the lower files are reached directly, keyed as stat() says."""
    lower, scratch = tmp_path / "lower", tmp_path / "scratch"
    for d in (lower, scratch):
        d.mkdir()
    with _mount("-t", "tmpfs", "cwlite-lower", str(lower)), _mount("-t", "tmpfs", "cwlite-upper", str(scratch)):
        shutil.copy2("/usr/bin/true", lower / "true-copy")
        layer_key = _exec_identity(probe, lower / "true-copy")
        (scratch / "upper").mkdir()
        (scratch / "work").mkdir()
        opts = f"xino=off,lowerdir={lower},upperdir={scratch / 'upper'},workdir={scratch / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "cwlite-test", "-o", opts, str(lower)], check=True)
        try:
            exe = lower / "true-copy"
            seen = _exec_identity(probe, exe)
            assert seen != layer_key and KernelIdentity().key(str(exe)) == seen[:2]
            build(tmp_path / "m.db", from_dir=[lower], trust_set="t")
            with MeasureDB.open(tmp_path / "m.db") as db:
                keys = {(e.dev, e.ino, e.ctime_ns) for e in kernel_view(db, ["t"])}
            assert keys == {seen}
        finally:
            assert uncover_host_root(keep=(), under=str(tmp_path)) == [str(lower)]
        assert _exec_identity(probe, exe) == layer_key
        assert KernelIdentity().key(str(exe)) == layer_key[:2]
        assert uncover_host_root(keep=(), under=str(tmp_path)) == []
