"""One RCU grace period, from user space: after it, every BPF program that was running has returned.

BPF programs run inside rcu_read_lock (tracepoint, cgroup and tc programs alike), and
membarrier(MEMBARRIER_CMD_GLOBAL) is synchronize_rcu(): a program that read a flag or a map slot
before an engine changed it has finished when this returns. prima.arming waits for one before it
detaches; portauthority.engine before it empties a retired count slot.
"""
from __future__ import annotations

import ctypes

MEMBARRIER_CMD_GLOBAL = 1
SYS_MEMBARRIER = 324  # x86_64


def grace_period() -> bool:
    """Wait for one RCU grace period; False when the kernel refused (no CONFIG_MEMBARRIER)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_MEMBARRIER, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0
