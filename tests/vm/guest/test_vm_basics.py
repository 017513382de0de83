"""Inside the VM: the kernel, the active LSMs, the backend cwlite picks, and the vTPM."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path


def test_kernel_is_debians(record_property) -> None:
    release = platform.release()
    record_property("kernel", release)
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64", release), release
    assert Path(f"/boot/vmlinuz-{release}").exists()


def test_bpf_is_an_active_lsm() -> None:
    lsms = Path("/sys/kernel/security/lsm").read_text().strip().split(",")
    assert "bpf" in lsms, lsms


def test_status_picks_the_lsm_backend(record_property) -> None:
    """`cwlite status` loads a real BPF LSM program here, so it must pick `lsm` (issue 3's claim)."""
    proc = subprocess.run([sys.executable, "-m", "controlplane.cli", "status", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    record_property("backend", status["backend"])
    record_property("bcc", f"{status['bcc'].get('version')} headers {status['bcc'].get('headers')}")
    assert status["lsm"]["bpf_loadable"] is True, status["lsm"]["detail"]
    assert status["backend"] == "lsm", status["backend_reason"]
    assert status["tpm"]["device"] == "/dev/tpmrm0"


def test_vtpm_answers_pcr_reads() -> None:
    assert os.path.exists("/dev/tpmrm0")
    env = dict(os.environ, TPM2TOOLS_TCTI="device:/dev/tpmrm0")
    proc = subprocess.run(["tpm2_pcrread", "sha256:10"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"10\s*:\s*0x[0-9A-F]{64}", proc.stdout), proc.stdout
