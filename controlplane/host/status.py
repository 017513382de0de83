"""`cwlite status`: what this machine offers cwlite, and which backend it would pick."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from cext import VMLINUX, Btf
from controlplane.core.errors import BtfError
from controlplane.core.paths import TPM_DEVICE
from ebpf import loader, probe

SECURITYFS_LSM = "/sys/kernel/security/lsm"


@dataclass(frozen=True)
class Status:
    kernel: str
    btf: dict
    lsm: dict
    tracepoint: dict
    cgroup_skb: dict
    tc: dict
    bcc: dict
    tpm: dict
    backend: str | None
    backend_reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _active_lsms() -> list[str] | None:
    path = Path(SECURITYFS_LSM)
    if not path.exists() and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "securityfs", "securityfs", "/sys/kernel/security"], capture_output=True)
    try:
        return path.read_text().strip().split(",")
    except OSError:
        return None


def _btf() -> dict:
    try:
        with Btf(VMLINUX) as btf:
            ctime = btf.first_field(*loader.KERNEL_FIELDS["INODE_I_CTIME_SEC"])
        return {"present": True, "path": VMLINUX, "ctime_field": ctime.path}
    except BtfError as exc:
        return {"present": False, "path": VMLINUX, "error": str(exc)}


def _bcc() -> dict:
    try:  # here, not at the top: a missing bcc is reported, and tracefs is mounted before `import bcc` (ebpf.loader)
        import bcc
    except ImportError:
        return {"version": None, "error": "bcc not importable: install python3-bpfcc (make setup)"}
    build = Path(f"/lib/modules/{platform.release()}/build")
    headers = str(build.resolve()) if build.exists() else None
    matches = headers is not None and platform.release() in Path(headers).name
    return {"version": getattr(bcc, "__version__", "unknown"), "headers": headers, "headers_match_kernel": matches}


def _tpm() -> dict:
    swtpm = shutil.which("swtpm")
    return {
        "device": TPM_DEVICE if os.path.exists(TPM_DEVICE) else None,
        "swtpm": swtpm,
        "use": "device" if os.path.exists(TPM_DEVICE) else ("embedded swtpm" if swtpm else None),
    }


def collect() -> Status:
    """Probe everything (loads real BPF programs when root) and pick the backend."""
    lsms = _active_lsms()
    lsm_probe = probe.probe_lsm()
    others = probe.probe_tracepoint_and_net()
    backend, reason = probe.pick_backend(lsm_probe, others["tracepoint"])
    return Status(
        kernel=platform.release(),
        btf=_btf(),
        lsm={"active": lsms, "bpf_listed": bool(lsms and "bpf" in lsms), "bpf_loadable": lsm_probe.ok, "detail": lsm_probe.detail},
        tracepoint=asdict(others["tracepoint"]),
        cgroup_skb=asdict(others["cgroup_skb"]),
        tc=asdict(others["tc"]),
        bcc=_bcc(),
        tpm=_tpm(),
        backend=backend,
        backend_reason=reason,
    )
