"""Capture a real kernel's IMA log (ima-ng, sha256) and its vTPM's PCRs 0-10 as test vectors.

    python -m tests.vectors.capture_kernel_ima          # boots a VM (tests/vm/harness.py), root, ~2 min
    python -m tests.vectors.capture_kernel_ima ima-sig  # the same with Debian's default template -> kernel_ima_sig.*

The VM boots Debian's kernel with `ima_template=ima-ng ima_hash=sha256` and a
fresh swtpm vTPM (firmware measures into PCRs 0-7, so the boot_aggregate is not
trivial). Inside it (`--guest`) this script loads a small IMA policy (measure
execs, and root's reads on one fresh tmpfs), runs a few programs there (one
with a space in its name) and provokes an open-writers violation, then reads
binary_runtime_measurements, ascii_runtime_measurements and PCRs 0-10 of the
sha256 bank, and writes them beside this file as kernel_ima.bin /
kernel_ima.ascii / kernel_ima.json. No cwlite code reads or writes the log
here: only the kernel's own bytes and the TPM's values.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMA = Path("/sys/kernel/security/ima")
LSMS = "lsm=lockdown,capability,landlock,yama,integrity,bpf"
TEMPLATES = {"ima-ng": "kernel_ima", "ima-sig": "kernel_ima_sig"}   # template -> vector file stem
TMPFS_MAGIC = 0x01021994


def _pcrs() -> dict[int, str]:
    env = dict(os.environ, TPM2TOOLS_TCTI="device:/dev/tpmrm0")
    out = subprocess.run(["tpm2_pcrread", "sha256:0,1,2,3,4,5,6,7,8,9,10"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return {int(k): v.lower() for k, v in re.findall(r"\b(\d+)\s*:\s*0x([0-9A-Fa-f]{64})", out)}


def _events(work: Path) -> None:
    """Real measurements: execs (BPRM_CHECK) and an open-writers violation (FILE_CHECK on this tmpfs)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "cwlite-ima", str(work)], check=True)
    (IMA / "policy").write_text("measure func=BPRM_CHECK mask=MAY_EXEC\n"
                                f"measure func=FILE_CHECK mask=MAY_READ uid=0 fsmagic=0x{TMPFS_MAGIC:x}\n")
    for name in ("tool", "with space"):
        shutil.copyfile("/bin/true", work / name)
        (work / name).chmod(0o755)
        subprocess.run([str(work / name)], check=True)
    script = work / "hello.sh"
    script.write_text("#!/bin/sh\necho hello > /dev/null\n")
    script.chmod(0o755)
    subprocess.run([str(script)], check=True)
    data = work / "data.txt"
    data.write_text("first\n")
    data.read_text()                          # measured (FILE_CHECK)
    with open(data, "a") as writer:           # a writer is open ...
        writer.write("more\n")
        writer.flush()
        data.read_text()                      # ... while root reads it: IMA logs an open-writers violation


def guest(out: Path, template: str) -> None:
    _events(Path("/tmp/cwlite-ima"))
    previous = None
    for _ in range(20):
        binary = (IMA / "binary_runtime_measurements").read_bytes()
        text = (IMA / "ascii_runtime_measurements").read_bytes()
        pcrs = _pcrs()
        again = (IMA / "binary_runtime_measurements").read_bytes()
        snapshot = (binary, text, pcrs)
        if binary == again and snapshot == previous:
            break
        previous = snapshot
    else:
        raise SystemExit("the IMA log kept growing")
    stem = TEMPLATES[template]
    (out / f"{stem}.bin").write_bytes(binary)
    (out / f"{stem}.ascii").write_bytes(text)
    (out / f"{stem}.json").write_text(json.dumps({
        "kernel": os.uname().release, "cmdline_ima": f"ima_template={template} ima_hash=sha256", "bank": "sha256",
        "pcrs": {str(k): v for k, v in sorted(pcrs.items())}, "entries": text.count(b"\n")}, indent=1) + "\n")


def host(template: str) -> None:
    import tempfile

    from tests.vm.harness import run_in_vm

    with tempfile.TemporaryDirectory(prefix="cwlite-ima-") as d:
        res = Path(d)
        cmd = f"mkdir -p /tmp/cwlite-ima && {sys.executable} -m tests.vectors.capture_kernel_ima --guest {res} {template}"
        run = run_in_vm(cmd, results_dir=res, timeout=900,
                        append=f"{LSMS} ima_template={template} ima_hash=sha256")
        if run.rc != 0:
            raise SystemExit(f"guest capture failed (rc {run.rc})")
        for ext in ("bin", "ascii", "json"):
            shutil.copyfile(res / f"{TEMPLATES[template]}.{ext}", HERE / f"{TEMPLATES[template]}.{ext}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--guest":
        guest(Path(sys.argv[2]), sys.argv[3])
    else:
        host(sys.argv[1] if len(sys.argv) > 1 else "ima-ng")
