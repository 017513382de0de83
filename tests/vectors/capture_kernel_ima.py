"""Capture real kernels' IMA logs and their vTPM's PCRs (sha1 and sha256 banks) as test vectors.

    python -m tests.vectors.capture_kernel_ima ima-ng   # ima_template=ima-ng  -> kernel_ima.*
    python -m tests.vectors.capture_kernel_ima ima-sig  # Debian's default     -> kernel_ima_sig.*
    python -m tests.vectors.capture_kernel_ima ima      # the original 'ima' template (SHA-1) -> kernel_ima_v1.*
    python -m tests.vectors.capture_kernel_ima mixed    # ima_policy=tcb|critical_data, every template -> kernel_ima_mixed.*

Each boots a VM (tests/vm/harness.py, root, 2-5 min under emulation) running
Debian's 6.1 kernel with a fresh swtpm vTPM (firmware measures into PCRs 0-7,
so the boot_aggregate is not trivial). Inside it (`--guest`) this script loads
an IMA policy, runs programs on a fresh tmpfs (one with a space in its name),
provokes an open-writers violation, then reads binary_runtime_measurements,
ascii_runtime_measurements and PCRs 0-15 of both banks with tpm2_pcrread, until
two readings agree, and writes them beside this file as <stem>.bin / .ascii /
.json. No cwlite code reads or writes the log here: only the kernel's own bytes
and the TPM's values.

The `mixed` scenario boots with `ima_policy=tcb|critical_data ima_template=ima-sig`
(the kernel's boot-time measurements and its `kernel_version` ima-buf entry),
then replaces the policy with per-rule templates (ima-ng, ima-ngv2, ima-modsig,
evm-sig and the old `ima` template, by file owner), rules that extend PCRs 11
and 12, and KEY_CHECK (the builtin keys queued at boot and an x509 key added
here, as ima-buf). Two files carry a security.ima signature (made here with a
fresh RSA key) so ima-sig/evm-sig fields are not empty. This 6.1 kernel is
built without CONFIG_IMA_APPRAISE_MODSIG, so ima-modsig's d-modsig and modsig
fields are always empty on it.
"""
from __future__ import annotations

import ctypes
import hashlib
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
TMPFS_MAGIC = 0x01021994
PCRS = ",".join(str(i) for i in range(16))
# scenario -> (vector file stem, kernel command line for IMA)
SCENARIOS = {
    "ima-ng": ("kernel_ima", "ima_template=ima-ng ima_hash=sha256"),
    "ima-sig": ("kernel_ima_sig", "ima_template=ima-sig ima_hash=sha256"),
    "ima": ("kernel_ima_v1", "ima_hash=sha1 ima_template=ima"),     # this order: 'ima' needs sha1 already set
    "mixed": ("kernel_ima_mixed", "ima_policy=tcb|critical_data ima_template=ima-sig"),
}
# mixed: file owner -> (template, PCR) of the rule that measures its exec
OWNERS = {1001: ("ima-ng", 11), 1002: ("ima-modsig", 10), 1003: ("evm-sig", 12), 1004: ("ima", 10),
          1005: ("ima-ngv2", 11)}


def _pcrs(bank: str) -> dict[int, str]:
    env = dict(os.environ, TPM2TOOLS_TCTI="device:/dev/tpmrm0")
    out = subprocess.run(["tpm2_pcrread", f"{bank}:{PCRS}"], env=env, capture_output=True, text=True,
                         check=True).stdout
    size = hashlib.new(bank).digest_size * 2
    return {int(k): v.lower() for k, v in re.findall(r"\b(\d+)\s*:\s*0x([0-9A-Fa-f]{%d})\b" % size, out)}


def _program(work: Path, name: str, owner: int | None = None) -> Path:
    path = work / name
    shutil.copyfile("/bin/true", path)
    path.chmod(0o755)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


def _violation(work: Path) -> None:
    data = work / "data.txt"
    data.write_text("first\n")
    data.read_text()                          # measured (FILE_CHECK)
    with open(data, "a") as writer:           # a writer is open ...
        writer.write("more\n")
        writer.flush()
        data.read_text()                      # ... while root reads it: IMA logs an open-writers violation


def _write_policy(rules: list[str]) -> list[str]:
    """Load `rules`; a rule this kernel refuses fails the whole write (then retried without it)."""
    for _ in range(len(rules)):
        try:
            (IMA / "policy").write_text("".join(r + "\n" for r in rules))
            return rules
        except OSError:
            # the kernel names nothing; drop the newest-feature rule (ima-ngv2) and retry
            bad = [r for r in rules if "ima-ngv2" in r]
            if not bad:
                raise
            rules = [r for r in rules if r not in bad]
    raise SystemExit("IMA policy refused")


def _simple_events(work: Path) -> None:
    """Execs (BPRM_CHECK) and an open-writers violation (FILE_CHECK on this tmpfs)."""
    _write_policy(["measure func=BPRM_CHECK mask=MAY_EXEC",
                   f"measure func=FILE_CHECK mask=MAY_READ uid=0 fsmagic=0x{TMPFS_MAGIC:x}"])
    for name in ("tool", "with space"):
        subprocess.run([str(_program(work, name))], check=True)
    script = work / "hello.sh"
    script.write_text("#!/bin/sh\necho hello > /dev/null\n")
    script.chmod(0o755)
    subprocess.run([str(script)], check=True)
    _violation(work)


def _sign_ima(path: Path, key) -> None:
    """security.ima = an IMA signature v2 (evm_ima_xattr_type 3, version 2, sha256) over the SHA-256 of
    `path`, a copy of /bin/true (not read here: a root read on this tmpfs would be measured first)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    digest = hashlib.sha256(Path("/bin/true").read_bytes()).digest()   # its content: reading it here would measure it
    sig = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    keyid = hashlib.sha1(spki).digest()[-4:]
    os.setxattr(path, "security.ima", bytes([3, 2, 4]) + keyid + len(sig).to_bytes(2, "big") + sig)


def _add_x509_key(key) -> None:
    """add_key("asymmetric", ...) of a self-signed x509 certificate into the session keyring (KEY_CHECK)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cwlite vector key")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    libc = ctypes.CDLL(None, use_errno=True)
    sys_add_key, session_keyring = 248, -3                      # x86_64 add_key, KEY_SPEC_SESSION_KEYRING
    serial = libc.syscall(sys_add_key, b"asymmetric", b"cwlite-vector", der, len(der), session_keyring)
    if serial < 0:
        raise SystemExit(f"add_key: {os.strerror(ctypes.get_errno())}")


def _mixed_events(work: Path) -> None:
    """Every template at once: per-rule templates by file owner, PCRs 10-12, keys, critical data, a violation."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    rules = [f"measure func=BPRM_CHECK mask=MAY_EXEC fowner={uid} template={tpl}" + (f" pcr={pcr}" if pcr != 10 else "")
             for uid, (tpl, pcr) in OWNERS.items()]
    rules += ["measure func=BPRM_CHECK mask=MAY_EXEC",
              f"measure func=FILE_CHECK mask=MAY_READ uid=0 fsmagic=0x{TMPFS_MAGIC:x}",
              "measure func=KEY_CHECK pcr=11",
              "measure func=CRITICAL_DATA"]
    loaded = _write_policy(rules)          # also measures the builtin keys IMA queued at boot
    (work / "policy.txt").write_text("".join(r + "\n" for r in loaded))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for uid, (tpl, _) in OWNERS.items():
        if not any(f"template={tpl}" in r for r in loaded):
            continue
        prog = _program(work, f"{tpl} tool", uid)
        if tpl in ("ima-modsig", "evm-sig"):
            _sign_ima(prog, key)
        subprocess.run([str(prog)], check=True)
    signed = _program(work, "signed")
    _sign_ima(signed, key)
    subprocess.run([str(signed)], check=True)                  # ima-sig with a signature field
    subprocess.run([str(_program(work, "with space"))], check=True)
    _add_x509_key(key)
    _violation(work)


def guest(out: Path, scenario: str) -> None:
    work = Path("/tmp/cwlite-ima")
    work.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "cwlite-ima", str(work)], check=True)
    (_mixed_events if scenario == "mixed" else _simple_events)(work)
    previous = None
    for _ in range(20):
        binary = (IMA / "binary_runtime_measurements").read_bytes()
        text = (IMA / "ascii_runtime_measurements").read_bytes()
        pcrs = {bank: _pcrs(bank) for bank in ("sha1", "sha256")}
        again = (IMA / "binary_runtime_measurements").read_bytes()
        snapshot = (binary, text, pcrs)
        if binary == again and snapshot == previous:
            break
        previous = snapshot
    else:
        raise SystemExit("the IMA log kept growing")
    stem, cmdline = SCENARIOS[scenario]
    (out / f"{stem}.bin").write_bytes(binary)
    (out / f"{stem}.ascii").write_bytes(text)
    meta = {"kernel": os.uname().release, "cmdline_ima": cmdline, "bank": "sha256",
            "pcrs": {str(k): v for k, v in sorted(pcrs["sha256"].items())},
            "pcrs_sha1": {str(k): v for k, v in sorted(pcrs["sha1"].items())},
            "entries": text.count(b"\n")}
    if scenario == "mixed":
        meta["policy"] = (work / "policy.txt").read_text().splitlines()
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")


def host(scenario: str) -> None:
    import tempfile

    from tests.vm.harness import run_in_vm

    stem, cmdline = SCENARIOS[scenario]
    with tempfile.TemporaryDirectory(prefix="cwlite-ima-") as d:
        res = Path(d)
        cmd = f"{sys.executable} -m tests.vectors.capture_kernel_ima --guest {res} {scenario}"
        run = run_in_vm(cmd, results_dir=res, timeout=1500, append=f"{LSMS} {cmdline}")
        if run.rc != 0:
            raise SystemExit(f"guest capture failed (rc {run.rc})")
        for ext in ("bin", "ascii", "json"):
            shutil.copyfile(res / f"{stem}.{ext}", HERE / f"{stem}.{ext}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--guest":
        guest(Path(sys.argv[2]), sys.argv[3])
    else:
        host(sys.argv[1] if len(sys.argv) > 1 else "ima-ng")
