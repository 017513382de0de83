"""BPF maps outside bcc: create, fill, freeze, and the ids of a program's maps (cext._bpf over libbpf).

prima.engine makes each policy generation's maps here: bcc creates maps only
with a BPF object, and a frozen map (BPF_MAP_FREEZE: no more writes through
bpf(2), programs still update it) cannot be refilled, so every generation gets
fresh maps, filled, frozen, then installed in bcc's map-of-maps slots.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from cext._bpf import ffi, lib
from controlplane.core.errors import KernelError

MAX_PROG_MAPS = 64  # maps one program may use (the verifier's limit is 64)


@dataclass(frozen=True)
class MapInfo:
    """A map as the kernel describes it (BPF_OBJ_GET_INFO_BY_FD)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise KernelError(f"bpf: {what}: {os.strerror(-rc)}")
    return rc


def map_info(fd: int) -> MapInfo:
    """BPF: BPF_OBJ_GET_INFO_BY_FD on a map fd."""
    out = [ffi.new("uint32_t *") for _ in range(6)]
    _check(lib.cwl_map_info(fd, *out), f"map fd {fd}: info")
    return MapInfo(*(p[0] for p in out))


def create_like(template_fd: int, name: str) -> int:
    """A new, empty map exactly like the template (type, sizes, flags, BTF types): what a
    map-of-maps slot typed by that template accepts; its fd. BPF: BPF_MAP_CREATE."""
    return _check(lib.cwl_map_create_like(template_fd, name.encode()), f"create map {name} like fd {template_fd}")


BPF_EXIST = 2  # include/uapi/linux/bpf.h: update only a key that is there


def update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    """BPF: BPF_MAP_UPDATE_ELEM (flags: BPF_ANY, or BPF_EXIST). KernelError names the errno (EPERM on a frozen map)."""
    _check(lib.bpf_map_update_elem(fd, key, value, flags), f"map fd {fd}: update")


def delete(fd: int, key: bytes) -> None:
    """BPF: BPF_MAP_DELETE_ELEM."""
    _check(lib.bpf_map_delete_elem(fd, key), f"map fd {fd}: delete")


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """BPF: BPF_MAP_LOOKUP_ELEM; None when the key is absent."""
    buf = ffi.new("char[]", value_size)
    rc = lib.bpf_map_lookup_elem(fd, key, buf)
    if rc == -2:  # ENOENT
        return None
    _check(rc, f"map fd {fd}: lookup")
    return bytes(ffi.buffer(buf, value_size))


def freeze(fd: int) -> None:
    """BPF: BPF_MAP_FREEZE: from now on bpf(2) cannot write the map; programs still can."""
    _check(lib.bpf_map_freeze(fd), f"map fd {fd}: freeze")


def fd_by_id(map_id: int) -> int:
    """BPF: BPF_MAP_GET_FD_BY_ID (read-write); the caller closes the fd."""
    return _check(lib.bpf_map_get_fd_by_id(map_id), f"map id {map_id}: get fd")


def prog_ids(fd: int) -> tuple[int, tuple[int, ...]]:
    """A program's id and the ids of the maps it uses. BPF: BPF_OBJ_GET_INFO_BY_FD on a prog fd."""
    prog_id = ffi.new("uint32_t *")
    ids = ffi.new("uint32_t[]", MAX_PROG_MAPS)
    n = ffi.new("uint32_t *", MAX_PROG_MAPS)
    _check(lib.cwl_prog_ids(fd, prog_id, ids, n), f"prog fd {fd}: info")
    return prog_id[0], tuple(ids[i] for i in range(min(n[0], MAX_PROG_MAPS)))


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach a program through a BPF link (its fd: closing it detaches, so does the process's death).
    BPF: BPF_LINK_CREATE (cgroup programs: several may share a cgroup, like BPF_F_ALLOW_MULTI)."""
    return _check(lib.cwl_link_create(prog_fd, target_fd, attach_type),
                  f"prog fd {prog_fd}: link to fd {target_fd} (attach type {attach_type})")


def enable_run_time_stats() -> int:
    """BPF: BPF_ENABLE_STATS (BPF_STATS_RUN_TIME). Programs' run counts and run time are kept while the
    returned fd is open (benchmarks: unlike the kernel.bpf_stats_enabled sysctl, no one else turns it off)."""
    return _check(lib.cwl_enable_run_time_stats(), "enable run-time stats")
