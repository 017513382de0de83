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
from prima.kernelview import kernel_dev, kernel_view
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
