"""What this kernel lets cwlite do, learned by loading real programs (never by reading lists).

The enforcement backend follows from it (DESIGN.md, "two backends"): `lsm` when
a BPF LSM program actually loads and attaches, else `tracepoint`.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from controlplane.core.errors import CwliteError
from ebpf import loader


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


def _needs_root() -> ProbeResult | None:
    return None if os.geteuid() == 0 else ProbeResult(False, "not probed: needs root")


def probe_lsm() -> ProbeResult:
    """Load and attach one allow-all BPF LSM program. BPF: probe.bpf.c bprm_check_security."""
    if (skip := _needs_root()) is not None:
        return skip
    try:
        bpf = loader.load("probe.bpf.c", ["-DCWL_PROBE_LSM"])
    except CwliteError as exc:
        return ProbeResult(False, str(exc))
    bpf.cleanup()
    return ProbeResult(True, "BPF LSM program loaded and attached")


def probe_tracepoint_and_net() -> dict[str, ProbeResult]:
    """Attach sched_process_exec and see it count a real exec; load cgroup_skb and sched_cls.

    BPF: probe.bpf.c sched_process_exec, cwl_probe_skb.
    """
    if (skip := _needs_root()) is not None:
        return {k: skip for k in ("tracepoint", "cgroup_skb", "tc")}
    try:
        bpf = loader.load("probe.bpf.c")
    except CwliteError as exc:
        fail = ProbeResult(False, str(exc))
        return {k: fail for k in ("tracepoint", "cgroup_skb", "tc")}
    import bcc  # after loader.load mounted tracefs: bcc looks for it at import (ebpf.loader)

    results: dict[str, ProbeResult] = {}
    try:
        child = subprocess.Popen(["/bin/true"])
        child.wait()
        counted = bpf["cwl_probe_execs"].get(bpf["cwl_probe_execs"].Key(child.pid))
        results["tracepoint"] = (
            ProbeResult(True, "sched:sched_process_exec attached and saw an exec")
            if counted is not None and counted.value >= 1
            else ProbeResult(False, "sched:sched_process_exec attached but saw no exec")
        )
        for key, prog_type, what in (("cgroup_skb", bcc.BPF.CGROUP_SKB, "cgroup_skb"), ("tc", bcc.BPF.SCHED_CLS, "sched_cls (tc)")):
            try:
                bpf.load_func("cwl_probe_skb", prog_type)
                results[key] = ProbeResult(True, f"{what} program loads")
            except Exception as exc:  # bcc raises plain Exception
                results[key] = ProbeResult(False, f"{what} program refused: {exc}")
    finally:
        bpf.cleanup()
    return results


def pick_backend(lsm: ProbeResult, tracepoint: ProbeResult) -> tuple[str | None, str]:
    """The enforcement backend cwlite would use, and why."""
    if lsm.ok:
        return "lsm", "BPF LSM programs load: deny before the event (-EPERM)"
    if tracepoint.ok:
        return "tracepoint", f"BPF LSM unavailable ({lsm.detail}); tracepoints work: kill on violation"
    return None, f"no backend: BPF LSM ({lsm.detail}), tracepoints ({tracepoint.detail})"
