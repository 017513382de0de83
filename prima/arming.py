"""Tracepoint backend: attach the per-syscall programs only while a labelled process exists.

Any attached syscall tracepoint sends every syscall of every process through the kernel's traced
entry path, and exec.bpf.c's raw `sys_enter` program (32-bit syscalls, which per-syscall
tracepoints never see) runs on each of them. The programs that judge only what a labelled
process does itself (ARMED_PROGRAMS) are therefore attached only while one exists ("armed"); the
others stay attached for the engine's life (sched_process_exec/fork/exit, which grant and track
labels; sys_enter_mmap, whose taint guards measured files against every process; sys_enter_bpf,
the self-protection guard; ptrace/process_vm_writev/open exits, an outsider's attacks on a TP;
signal_generate, below).

The race, and why it closes (exec.bpf.c `cwl_entered`):
- Arm: a process that enters a label from none while cwl_arm[ARMED] is clear is held: the exec
  program sets CWL_TL_HELD, sends it SIGSTOP (taken before its first user instruction) and posts
  its tgid on cwl_arm_req. This thread wakes, attaches the programs, sets ARMED, then clears
  CWL_TL_HELD and continues the process: its first instruction runs with every program attached.
  A SIGCONT from anyone else first is a logged violation (signal_generate: the sender is
  killed); the released process is killed here. A 64-bit ptrace of the held process is judged by
  the always-attached ptrace exit like any other.
- Disarm (no labelled process for DISARM_AFTER_S): clear ARMED and LIVE, wait one RCU grace
  period (membarrier(MEMBARRIER_CMD_GLOBAL) is synchronize_rcu(), and every BPF tracepoint program
  runs inside rcu_read_lock), then look again: an exec that read ARMED still set has inserted its
  label by then and is found (re-arm); one that reads it clear is held. Only when none is found are
  the programs detached. If the grace period cannot be had, the engine stays armed (fail closed).

Confining (`confine`, Port Authority on this backend): its cgroup programs run only on TP cgroups,
so cwl_arm[CONFINE] makes a label entry outside one (cwl_tp_cgroups) a hold as well, and the release
first hands the process to `adopt`, which moves it into a TP cgroup; one that cannot be moved is
killed instead of continued. A TP's children and later execs stay in its cgroup and are not held.

What it costs, and why the rest stays attached (issue 21, speed; the kernel's own count,
kernel.bpf_stats_enabled, per fork+exec of an unlabelled dynamic binary on the 6.18 host: a
fork+exec+wait is ~33 syscalls, 8 of them mmap and 2-3 openat):
- Any attached syscall tracepoint sets SYSCALL_WORK_SYSCALL_TRACEPOINT on every thread: every syscall
  of every process takes the traced entry/exit path, +65 to +81 ns per getppid on the idle 6.18 host
  (one attached tracepoint costs what all of them cost). A BPF program costs mostly its dispatch
  here (retpolines, call-depth tracking): an EMPTY raw sys_enter program adds ~95 ns to every
  getppid, so the raw sys_enter program is the armed tax (~170 ns a syscall; it returns after one
  test for any 64-bit syscall, a plain load through the BTF task pointer).
- The disarmed set keeps the traced path on (sys_enter_mmap and sys_enter_bpf, below, must see every
  process); beyond it, it is judged by runs per exec: sys_enter_mmap 8, the open exits 2-3 (one array
  lookup each while no label exists), sched_process_exec/fork/exit and signal_generate 1 each,
  ptrace/process_vm_writev/bpf ~0. Moving the open and ptrace exits into the armed set would save
  ~0.3 us per exec (<0.1%) and open the held window to a /proc/PID/mem write or a ptrace
  attach-poke-detach that no later check can see; they stay. sys_enter_mmap (taint: a shared
  writable mapping of a measured file) and sys_enter_bpf (self-protection) have no non-syscall
  tracepoint that sees their event on 6.18 (mmap:vm_unmapped_area has no file; no kprobes, no
  fentry on the host), so they stay too.
- The per-exec programs return early for unlabelled processes: sched_process_exec reads only the
  file's map key (dev, ino) to know it is no entrypoint; sched_process_exit and signal_generate
  are raw tracepoints (no perf record built), and the exit looks a label up before it deletes (a
  delete takes the bucket lock even for an absent key).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

from cext import bpfmap
from controlplane.core.errors import CwliteError
from ebpf import abi
from prima import selfprotect

if TYPE_CHECKING:
    import bcc

# exec.bpf.c's programs attached only while armed (bcc names: raw tracepoint / category:event).
ARMED_RAW = ("sys_enter",)
ARMED_TRACEPOINTS = tuple(f"syscalls:sys_enter_{n}" for n in (
    "mprotect", "pkey_mprotect", "shmat", "io_uring_setup",
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_send_signal"))
DISARM_AFTER_S = 2.0     # no labelled process for this long: detach
ARM_POLL_MS = 200        # the arming thread also looks this often (a lost arm request is found)
MEMBARRIER_CMD_GLOBAL = 1
SYS_MEMBARRIER = 324     # x86_64


def _flag(bpf: "bcc.BPF", which: str, value: int) -> None:
    table = bpf[b"cwl_arm"]
    table[table.Key(abi.value(f"CWL_ARM_{which}"))] = ctypes.c_uint32(value)


def _grace_period() -> bool:
    """One RCU grace period (membarrier(MEMBARRIER_CMD_GLOBAL) calls synchronize_rcu()); False when refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_MEMBARRIER, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0


class Arming:
    """BPF: exec.bpf.c (tracepoint) cwl_arm, cwl_arm_req, ARMED_RAW / ARMED_TRACEPOINTS: attaches
    them while a labelled process exists; a thread of the daemon does it (see the module text)."""

    def __init__(self, bpf: "bcc.BPF") -> None:
        from bcc import libbcc  # loaded already (the engine compiled): bcc decides at import where tracefs is

        self._bpf = bpf
        self._lib = libbcc.lib
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.armed = True  # bcc attached every program at load
        self.arms = 0      # times armed since start (tests and benchmarks read it)
        self.errors = 0    # failed steps (the engine reports each as lost events: enforcement was impaired)
        self.last_error: Exception | None = None
        self._idle_since: float | None = None
        self._adopt: Callable[[int], int] | None = None  # confine(): moves a process into a TP cgroup
        self._cb = libbcc._RINGBUF_CB_TYPE(lambda ctx, data, size: 0)  # records only wake the thread
        self._rb = self._lib.bpf_new_ringbuf(bpf[b"cwl_arm_req"].map_fd, self._cb, None)
        if not self._rb:
            raise OSError("cwl_arm_req: cannot open the ring buffer")
        self._disarm_now()  # nothing is labelled before the first generation is written
        self._thread = threading.Thread(target=self._run, name="cwlite-arming", daemon=True)
        self._thread.start()

    # ---- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._lib.bpf_poll_ringbuf(self._rb, ARM_POLL_MS)
            if self._stop.is_set():
                break
            with self._lock:
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 - kept for the engine to log; held processes stay held
                    self.errors += 1
                    self.last_error = exc

    def step(self) -> None:
        """Arm when a labelled process exists (and release held ones); disarm after DISARM_AFTER_S without one."""
        labelled = self._labelled()
        if labelled:
            self._idle_since = None
            if not self.armed or any(flags & abi.value("CWL_TL_HELD") for _, flags in labelled.values()):
                self._arm(labelled)
            return
        if not self.armed:
            return
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= DISARM_AFTER_S:
            self._disarm_now()

    def _labelled(self) -> dict[int, tuple[int, int]]:
        """tgid -> (label, flags) of every labelled process (the daemon's reserved label left out)."""
        daemon = selfprotect.daemon_label()
        return {k.value: (v.label, v.flags) for k, v in self._bpf[b"cwl_task_labels"].items() if v.label != daemon}

    def _arm(self, labelled: dict[int, tuple[int, int]]) -> None:
        bpf = self._bpf
        if not self.armed:
            for tp in ARMED_RAW:
                if tp.encode() not in bpf.raw_tracepoint_fds:
                    bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=f"raw_tracepoint__{tp}".encode())
            for tp in ARMED_TRACEPOINTS:
                if tp.encode() not in bpf.tracepoint_fds:
                    bpf.attach_tracepoint(tp=tp.encode(), fn_name=f"tracepoint__{tp.replace(':', '__')}".encode())
            self.armed = True
            self.arms += 1
        _flag(bpf, "LIVE", 1)
        _flag(bpf, "ARMED", 1)
        self._release(labelled)

    def _release(self, labelled: dict[int, tuple[int, int]]) -> None:
        """Continue the held processes (the programs are attached; confining, each moved into a TP
        cgroup first); kill those someone else continued, or that could not be moved."""
        held, released = abi.value("CWL_TL_HELD"), abi.value("CWL_TL_RELEASED")
        fd = self._bpf[b"cwl_task_labels"].map_fd
        for tgid, (label, flags) in labelled.items():
            if not flags & held:
                continue
            if self._adopt is not None and not flags & released and not self._adopted(tgid):
                flags |= released  # it must not run outside: killed below
            key = struct.pack("=I", tgid)
            with contextlib.suppress(CwliteError):  # gone meanwhile: nothing to release (BPF_EXIST: never re-added)
                bpfmap.update(fd, key, struct.pack("=II", label, flags & ~held), bpfmap.BPF_EXIST)
            with contextlib.suppress(ProcessLookupError):
                os.kill(tgid, signal.SIGKILL if flags & released else signal.SIGCONT)

    def _adopted(self, tgid: int) -> bool:
        """Move `tgid` into a TP cgroup (confine's `adopt`) and let the exec programs know its id."""
        assert self._adopt is not None
        try:
            cgroup_id = self._adopt(tgid)
        except ProcessLookupError:
            return False
        except Exception as exc:  # noqa: BLE001 - counted and kept for the engine to log; the process dies
            self.errors += 1
            self.last_error = exc
            return False
        self._bpf[b"cwl_tp_cgroups"][ctypes.c_uint64(cgroup_id)] = ctypes.c_uint8(1)
        return True

    def confine(self, adopt: Callable[[int], int]) -> None:
        """From now on labelled processes run only in TP cgroups: a label entry elsewhere is held
        (exec.bpf.c cwl_entered) until `adopt(tgid)` moved the process into one (it returns that
        cgroup's id). Port Authority's engine adopts: its cgroup programs run on TP cgroups only.
        A process labelled before this call is adopted now; one that cannot be is killed."""
        with self._lock:
            self._adopt = adopt
            _flag(self._bpf, "CONFINE", 1)
            for tgid in self._labelled():
                if not self._adopted(tgid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(tgid, signal.SIGKILL)

    def _disarm_now(self) -> None:
        bpf = self._bpf
        _flag(bpf, "ARMED", 0)
        _flag(bpf, "LIVE", 0)
        labelled = self._labelled() if _grace_period() else None
        if labelled is None or labelled:
            self._arm(labelled or {})  # a label entered meanwhile, or no grace period: stay armed
            self._idle_since = None
            return
        for tp in ARMED_RAW:
            if tp.encode() in bpf.raw_tracepoint_fds:
                bpf.detach_raw_tracepoint(tp=tp.encode())
        for tp in ARMED_TRACEPOINTS:
            if tp.encode() in bpf.tracepoint_fds:
                bpf.detach_tracepoint(tp=tp.encode())
        self.armed = False
        self._idle_since = None

    # ---- control ---------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the attachment as it is meanwhile (benchmarks detach programs for a baseline round)."""
        with self._lock:
            yield

    def close(self) -> None:
        """Stop the thread; continue any process still held (the engine is stopping: nothing is enforced after)."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            labelled = self._labelled()
            self._release(labelled)
        self._lib.bpf_free_ringbuf(self._rb)
