"""File identity as the kernel sees it, and the measurement DB's view for the BPF maps.

A BPF program keys a file by (super_block.s_dev in the kernel's encoding,
i_ino) and checks its ctime cookie; userspace sees st_dev in glibc's encoding,
per-subvolume devices on btrfs, and overlay inodes whose mappings are the
layer's file. This module bridges the two: `kernel_dev`, `KernelIdentity`,
and `kernel_view()`, which turns a MeasureDB's trusted content into the
entries prima.engine writes to `cwl_trust*`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from controlplane.core.errors import MeasureDBError
from prima.measuredb import MeasureDB

SETS_MAX = 64  # trust sets in one kernel view: one bit each in a u64 sets_mask


def kernel_dev(st_dev: int) -> int:
    """Userspace st_dev (glibc's major/minor encoding) -> dev_t as the kernel keeps it in super_block.s_dev.

    The kernel's internal dev_t is MAJOR<<20 | MINOR (include/linux/kdev_t.h),
    which is what a BPF program reads; stat() reports the "huge" encoding
    glibc's major()/minor() decode (major<<8|minor for small numbers).
    """
    return (os.major(st_dev) << 20) | os.minor(st_dev)


@dataclass(frozen=True)
class KernelEntry:
    """One BPF map entry: key (dev as the kernel encodes it, ino), value (trust-set bitmask, ctime cookie)."""

    dev: int
    ino: int
    ctime_ns: int
    sets_mask: int
    digest: bytes
    path: str


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


def kernel_view(db: MeasureDB, trust_sets: Sequence[str]) -> list[KernelEntry]:
    """BPF map entries for files on this machine whose current content is trusted in `trust_sets`.

    Bit i of `sets_mask` is trust_sets[i] (the policy fixes the order).
    Candidates are the paths the DB knows (measured paths and the local
    cache); each is stat()ed (following symlinks, so /bin/ls of a
    merged-/usr system is /usr/bin/ls's inode), and a file whose
    size/mtime/ctime changed since it was measured is measured again: if
    its content is no longer trusted, it is not in the view.
    """
    db.require_sets(trust_sets)
    if len(trust_sets) > SETS_MAX:
        raise MeasureDBError(f"{db.path}: kernel view: {len(trust_sets)} trust sets; at most {SETS_MAX} fit the bitmask")
    masks: dict[bytes, int] = {}
    for i, name in enumerate(trust_sets):
        for d in db.trusted_digests(name):
            masks[d] = masks.get(d, 0) | (1 << i)
    paths = db.known_paths(trust_sets)
    ids = KernelIdentity()
    current = db.measure_paths(paths + ids.overlay_layer_paths(paths))
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
