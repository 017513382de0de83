"""Enforcement protects itself: what the engine records so ebpf/selfprotect.h can tell cwlite apart.

BPF: ebpf/exec.bpf.c "self-protection" section (lsm: `bpf`, `task_kill`; tracepoint: sys_enter_bpf,
sys_enter_kill/tkill/tgkill/rt_(tg)sigqueueinfo/pidfd_send_signal) reads the maps of
ebpf/selfprotect.h:
  cwl_daemon          the daemon's tgid and process group: written once at start, then frozen;
  cwl_daemon_threads  the daemon's thread ids (signals aimed at a thread), kept by `track_threads`;
  cwl_objs            the ids of this engine's programs and of every map they use, plus each
                      generation's maps (`add_maps` / `remove_maps`).
The daemon also carries the reserved label CWL_LABEL_DAEMON (`label_daemon`), so the rule "only a
subject's own label may ptrace it or write its memory" covers it, while PRIMA treats it as unlabelled.
"""
from __future__ import annotations

import ctypes
import os
import struct
from typing import TYPE_CHECKING, Iterable

from cext import VMLINUX, bpfmap
from ebpf import abi
from prima.cdi import lsm_hook_params

if TYPE_CHECKING:
    import bcc

DAEMON_LABEL_NAME = "cwlite"  # how events name the reserved label


def daemon_label() -> int:
    """CWL_LABEL_DAEMON: the daemon's reserved label id (never a policy label)."""
    return abi.value("CWL_LABEL_DAEMON")


def describe(op: str, what: int, whom: int) -> str:
    """The subject of a self-protection event (selfprotect.h: dev = what, ino = whom)."""
    if op == "bpf":
        kind = {abi.value("CWL_OBJ_MAP"): "map", abi.value("CWL_OBJ_PROG"): "link of prog"}.get(whom >> 32, "object")
        command = abi.names("CWL_BPF_", exclude=("CWL_BPF_ATTR_FD", "CWL_BPF_ATTR_BATCH_MAP_FD")).get(what)
        return f"{command.lower().replace('_', '-') if command else f'cmd-{what}'} {kind} {whom & 0xffffffff}"
    return f"signal {what} to {ctypes.c_int32(whom & 0xffffffff).value}"


def lsm_cflags(btf_path: str = VMLINUX) -> list[str]:
    """-D flags for this kernel's `bpf` LSM hook (6.16+ pass a 4th argument, `kernel`)."""
    return ["-DCWL_LSM_BPF_KERNEL_ARG"] if len(lsm_hook_params("bpf", btf_path)) > 3 else []


def _obj_key(kind: str, obj_id: int) -> bytes:
    return struct.pack("=Q", (abi.value(f"CWL_OBJ_{kind}") << 32) | obj_id)


def _fd(bpf: "bcc.BPF", name: str) -> int:
    return bpf[name.encode()].map_fd


def program_objects(bpf: "bcc.BPF") -> tuple[set[int], set[int]]:
    """(program ids, ids of the maps they use) of a loaded bcc object."""
    progs, maps = set(), set()
    for fn in bpf.funcs.values():
        prog_id, map_ids = bpfmap.prog_ids(fn.fd)
        progs.add(prog_id)
        maps.update(map_ids)
    return progs, maps


def register(bpf: "bcc.BPF", *, into: "bcc.BPF | None" = None) -> None:
    """Record a bcc object's programs and the maps they use in cwl_objs: this engine's own (before the
    daemon is recorded), or, with `into` (PRIMA's object), another engine's of the same daemon (Port Authority)."""
    guard = into if into is not None else bpf
    progs, maps = program_objects(bpf)
    fd = _fd(guard, "cwl_objs")
    for p in progs:
        bpfmap.update(fd, _obj_key("PROG", p), b"\1")
    add_maps(guard, maps)


def add_maps(bpf: "bcc.BPF", map_ids: Iterable[int]) -> None:
    """Guard these maps too (a generation's fresh maps, before they are installed)."""
    fd = _fd(bpf, "cwl_objs")
    for m in map_ids:
        bpfmap.update(fd, _obj_key("MAP", m), b"\1")


def remove_maps(bpf: "bcc.BPF", map_ids: Iterable[int]) -> None:
    """Forget maps the engine no longer uses (a replaced generation's, once closed)."""
    fd = _fd(bpf, "cwl_objs")
    for m in map_ids:
        try:
            bpfmap.delete(fd, _obj_key("MAP", m))
        except Exception:  # noqa: BLE001 - already gone is fine
            pass


def label_daemon(bpf: "bcc.BPF", backend: str) -> None:
    """Give this process the reserved label. tracepoint: cwl_task_labels[tgid]; lsm: the task storage
    of the thread-group leader (a pidfd key); the daemon's other threads get it at their next bpf(2)
    call (exec.bpf.c `bpf` hook) and new ones inherit it at task_alloc."""
    value = struct.pack("=II", daemon_label(), 0)
    if backend == "tracepoint":
        bpfmap.update(_fd(bpf, "cwl_task_labels"), struct.pack("=I", os.getpid()), value)
        return
    from bcc import libbcc  # loaded already (the engine compiled): bcc decides at import where tracefs is

    fd = libbcc.lib.bpf_table_fd(bpf.module, b"cwl_task_label_ls")
    pidfd = os.pidfd_open(os.getpid())
    try:
        bpfmap.update(fd, struct.pack("=i", pidfd), value)
    finally:
        os.close(pidfd)


def track_threads(bpf: "bcc.BPF", known: set[int]) -> set[int]:
    """Bring cwl_daemon_threads in line with /proc/self/task; returns the new set (cheap when unchanged)."""
    now = {int(t) for t in os.listdir("/proc/self/task")}
    if now == known:
        return known
    fd = _fd(bpf, "cwl_daemon_threads")
    for tid in now - known:
        bpfmap.update(fd, struct.pack("=I", tid), b"\1")
    for tid in known - now:
        try:
            bpfmap.delete(fd, struct.pack("=I", tid))
        except Exception:  # noqa: BLE001 - a thread that left meanwhile
            pass
    return now


def record_daemon(bpf: "bcc.BPF") -> None:
    """Write (tgid, process group) of this process into cwl_daemon and freeze it: from now on the
    guards are live, and nobody (the daemon included) can name another daemon."""
    fd = _fd(bpf, "cwl_daemon")
    bpfmap.update(fd, struct.pack("=I", 0), struct.pack("=II", os.getpid(), os.getpgid(0)))
    bpfmap.freeze(fd)
