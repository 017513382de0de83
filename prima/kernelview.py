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
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from controlplane.core.errors import MeasureDBError
from prima import measure
from prima.measure import Mount, mounts
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
    """One BPF map entry: key (dev as the kernel encodes it, ino), value (trust-set bitmask, ctime cookie,
    and when its content was read: CLOCK_MONOTONIC ns, what the kernel's taint records compare with)."""

    dev: int
    ino: int
    ctime_ns: int
    sets_mask: int
    digest: bytes
    path: str
    measured_ns: int = 0


class KernelIdentity:
    """Maps what stat() says to what the kernel keys on: super_block.s_dev (kernel encoding) per file.

    stat()'s st_dev is the superblock's device on most filesystems (ext4,
    xfs, tmpfs, 9p, a single-filesystem overlayfs), but not everywhere:
    btrfs reports a per-subvolume anonymous device while its inodes carry
    the one superblock's s_dev (and inode numbers repeat across
    subvolumes); an overlayfs whose layers are on different filesystems
    without xino (virtme-ng's tmpfs over the 9p root) reports a file's
    st_dev as a pseudo device it allocated for the layer's filesystem
    (fs/overlayfs/inode.c ovl_map_dev_ino: `fs[fsid].pseudo_dev`), while
    exec and open see the overlay's own inode: the overlay's s_dev, and the
    layer's inode number (ovl_map_ino). A file whose st_dev is no mounted
    superblock's is mapped through the mount that holds it.
    """

    def __init__(self, mount_list: Sequence[Mount] | None = None) -> None:
        self.mounts = list(mounts() if mount_list is None else mount_list)
        self._sb_devs = {m.dev for m in self.mounts}
        # deepest point first; on one point the mount made last (it covers the others)
        self._by_depth = [m for _i, m in sorted(enumerate(self.mounts), key=lambda im: (len(im[1].point), im[0]),
                                                reverse=True)]

    def dev(self, path: str, st_dev: int) -> int:
        """The kernel's dev_t for the file at `path` whose stat() gave `st_dev`."""
        if st_dev in self._sb_devs or not self.mounts:
            return kernel_dev(st_dev)
        m = self._holding(path)
        return kernel_dev(m.dev if m is not None else st_dev)

    def _holding(self, path: str) -> Mount | None:
        """The deepest mount whose point holds `path` (symlinks resolved)."""
        real = os.path.realpath(path)
        return next((m for m in self._by_depth if real == m.point or real.startswith(m.point.rstrip("/") + "/")), None)

    def key(self, path: str) -> tuple[int, int]:
        """The kernel's (dev, ino) for the file at `path` (symlinks followed): what an exec or open of it
        reads, so what a BPF map keyed on it must hold. OSError when it cannot be stat()ed."""
        st = os.stat(path)
        return self.dev(path, st.st_dev), st.st_ino

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
            # a two-filesystem overlay's files stat() as the layer's pseudo device: found by their mount
            m = overlays.get(st.st_dev) if st.st_dev in self._sb_devs else self._holding(p)
            if m is None or m.fstype != "overlay":
                continue
            rel = os.path.relpath(os.path.realpath(p), m.point)
            for layer in m.layer_dirs():
                candidate = os.path.join(layer, rel)
                if os.path.lexists(candidate):
                    # a hidden layer (mounted over by the overlay itself) has no path: its file is left out,
                    # and the kernel finds the layer inode untrusted (overlay-layer-untrusted: fail closed)
                    if not m.hides(layer):
                        out.append(candidate)
                    break
        return out


Watch = Callable[[Iterable[tuple[int, int]]], None]  # prima.engine Engine.watch: kernel keys about to be read


def kernel_view_bound(db: MeasureDB, trust_sets: Sequence[str]) -> int:
    """The most files kernel_view(db, trust_sets) can watch and return (each candidate path and its
    overlayfs layer file): what the engine's maps must hold."""
    return 2 * len(db.known_paths(trust_sets))


def kernel_view(db: MeasureDB, trust_sets: Sequence[str], *, watch: Watch | None = None) -> list[KernelEntry]:
    """BPF map entries for files on this machine whose current content is trusted in `trust_sets`.

    Bit i of `sets_mask` is trust_sets[i] (the policy fixes the order).
    Candidates are the paths the DB knows (measured paths and the local
    cache); each is stat()ed (following symlinks, so /bin/ls of a
    merged-/usr system is /usr/bin/ls's inode) and measured again unless
    the cache may answer (MeasureDB.file_cache): if its content is no longer
    trusted, it is not in the view. A file open for write now (or while it
    was read) is left out: its content may be changing.

    `watch` (prima.engine Engine.watch) gets every kernel key before any
    content is read, and each entry's measured_ns is taken after that: the
    kernel then refuses the file if a write is enabled on it any time later.
    """
    db.require_sets(trust_sets)
    if len(trust_sets) > SETS_MAX:
        raise MeasureDBError(f"{db.path}: kernel view: {len(trust_sets)} trust sets; at most {SETS_MAX} fit the bitmask")
    masks: dict[bytes, int] = {}
    for i, name in enumerate(trust_sets):
        for d in db.trusted_digests(name):
            masks[d] = masks.get(d, 0) | (1 << i)
    ids = KernelIdentity()
    paths = db.known_paths(trust_sets)
    paths += ids.overlay_layer_paths(paths)
    if watch is not None:
        keys = []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                continue
            keys.append((ids.dev(p, st.st_dev), st.st_ino))
        watch(keys)
    measured_ns = time.monotonic_ns()
    current = db.measure_paths(paths)
    entries: dict[tuple[int, int], KernelEntry] = {}
    for m in current.values():
        mask = masks.get(m.sha256 or b"", 0)
        if not mask or not m.stable or (m.reused and measure.has_writers(m.path)):
            continue
        key = (ids.dev(m.path, m.ident.dev), m.ident.ino)
        # Two files on one key (btrfs subvolumes repeat inode numbers): keep the first; the
        # other's ctime cookie will not match, so it is denied (fail closed), never confused.
        entries.setdefault(key, KernelEntry(key[0], key[1], m.ident.ctime_ns, mask, m.sha256, m.path, measured_ns))
    return sorted(entries.values(), key=lambda e: (e.dev, e.ino))
