"""Inside the VM: the project's .deb installs with dpkg, `cwlite status` runs from it, and the attestation
unit starts as systemd would start it and answers over HTTPS.

The guest's root is the host's over 9p, read-only. dpkg writes /usr (the payload, /usr/lib/systemd/system
under merged /usr), /etc (the conffile, the unit's enablement) and /var (its database, /var/lib/cwlite):
each gets an overlay with a tmpfs upper layer over what the guest sees there (9p, or virtme's own overlay
of 9p; overlayfs takes either as a read-only lower layer, Documentation/filesystems/overlayfs.rst). The
package is the one `make deb` built on the host (test_vm_tier.py builds it before the boot when missing).
virtme's init is not systemd, so the test reads ExecStart from the installed unit and runs that command
line with a test policy in /etc/cwlite/policy.toml (the unit's ConditionPathExists) and a measurement DB
the installed `cwlite db build` made at the path /etc/cwlite/cwlite.toml names.
"""
from __future__ import annotations

import configparser
import hashlib
import http.client
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

REPO = Path(__file__).resolve().parents[3]
OVERLAID = ("/usr", "/etc", "/var")            # every tree dpkg and the package's maintainer scripts write
UPPER = Path("/run/cwlite-deb-upper")          # tmpfs: the writes vanish with the VM
UNIT = Path("/lib/systemd/system/cwlite-attest.service")
PCR = 12                                       # other guest tests use 10 (kernel IMA), 11, 13-16
PORT = 8443                                    # the unit's (the config file's default)
# what systemd gives a unit: no PYTHONPATH or virtualenv of the test run, cwd /
UNIT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
POLICY = """\
mode = "audit"
backend = "lsm"
pcr = {pcr}
trust_sets = ["toolchain"]

[labels.tp_build]
entrypoints = ["{entry}"]
trust_set = "toolchain"
"""

pytestmark = pytest.mark.timeout(900)


def _mounted(target: str) -> list[str]:
    """The filesystem types mounted at `target`, oldest first."""
    return [f for _dev, t, f, *_ in (line.split() for line in Path("/proc/self/mounts").read_text().splitlines())
            if t == target]


@pytest.fixture(scope="module")
def writable_root() -> Iterator[None]:
    """/usr, /etc and /var writable for the test's lifetime: overlays with tmpfs upper layers, unmounted after."""
    done: list[str] = []
    try:
        for target in OVERLAID:
            upper, work = UPPER / target.strip("/") / "upper", UPPER / target.strip("/") / "work"
            upper.mkdir(parents=True)
            work.mkdir(parents=True)
            proc = subprocess.run(["mount", "-t", "overlay", "cwlite-deb", "-o",
                                   f"lowerdir={target},upperdir={upper},workdir={work}", target],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, f"overlay on {target} (lower {_mounted(target) or ['9p']}): {proc.stderr}"
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            subprocess.run(["umount", "-l", target], check=True)
        subprocess.run(["rm", "-rf", str(UPPER)], check=True)


@pytest.fixture(scope="module")
def installed(writable_root: None) -> Path:
    """The host-built .deb, installed by dpkg (maintainer scripts included)."""
    debs = sorted((REPO / "build/deb").glob("cwlite_*_amd64.deb"))
    assert debs, f"{REPO}/build/deb: no cwlite_*_amd64.deb (the vm tier runs `make deb` first; run it by hand)"
    # man-db's trigger re-indexes every manual page on the system: hours over 9p under emulation. A build VM
    # image turns it off the way Debian's own images do (the man pages still install; `mandb` builds the index).
    Path("/var/lib/man-db/auto-update").unlink(missing_ok=True)
    try:
        proc = subprocess.run(["dpkg", "-i", str(debs[-1])], env=UNIT_ENV, cwd="/", capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"dpkg -i: still running after {exc.timeout} s: {exc.stdout!r:.2000} {exc.stderr!r:.1000}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return debs[-1]


def _cwlite(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/cwlite", *args], env=UNIT_ENV, cwd="/", capture_output=True, text=True,
                          timeout=timeout)


def test_dpkg_installs_the_package_and_its_maintainer_scripts_ran(installed: Path) -> None:
    state = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "cwlite"], capture_output=True, text=True,
                           check=True).stdout
    assert state.startswith("install ok installed "), state
    assert installed.name.startswith(f"cwlite_{state.split()[-1]}_")
    assert (Path("/var/lib/cwlite").stat().st_mode & 0o777) == 0o700
    # postinst: deb-systemd-helper enabled the attestation unit (the enforcement one is --no-enable)
    wants = Path("/etc/systemd/system/multi-user.target.wants")
    assert (wants / "cwlite-attest.service").resolve() == UNIT.resolve()
    assert not (wants / "cwlite-enforce.service").exists()
    where = subprocess.run(["/usr/bin/python3", "-c", "import controlplane, fastapi; print(controlplane.__file__, "
                            "fastapi.__file__)"], env=dict(UNIT_ENV, PYTHONPATH="/usr/lib/cwlite/python"), cwd="/",
                           capture_output=True, text=True, timeout=120)
    ours, bundled = where.stdout.split()
    assert ours.startswith("/usr/lib/python3/dist-packages/controlplane/"), where.stdout + where.stderr
    assert bundled.startswith("/usr/lib/cwlite/python/fastapi/")


def test_the_installed_cwlite_status_reports_the_guest(installed: Path) -> None:
    proc = _cwlite("status", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["kernel"] == os.uname().release
    assert status["backend"] == "lsm", status["backend_reason"]   # the guest boots with BPF LSM


def _exec_start() -> list[str]:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read_string(UNIT.read_text())
    return shlex.split(unit["Service"]["ExecStart"])


def _spki_sha256(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return hashlib.sha256(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _health(deadline: float, service: subprocess.Popen) -> tuple[dict, str]:
    """GET /v1/health over TLS once the service listens; with the SPKI hash of the certificate it presented."""
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE        # a fresh self-signed key per start: the log's tls-key entry vouches
    while True:
        assert service.poll() is None, f"the unit's command exited {service.returncode}"
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", PORT, context=tls, timeout=30)
            conn.request("GET", "/v1/health")
            body = conn.getresponse().read()
            assert conn.sock is not None
            der = conn.sock.getpeercert(binary_form=True)
            conn.close()
            return json.loads(body), _spki_sha256(der)
        except (ConnectionRefusedError, socket.timeout):
            assert time.monotonic() < deadline, "the service did not answer"
            time.sleep(1)


def test_the_attestation_unit_starts_as_systemd_would_and_serves_https(installed: Path, tmp_path: Path) -> None:
    assert UNIT.exists()
    argv = _exec_start()
    assert argv[0] == "/usr/bin/cwlite" and "serve" in argv
    tools = tmp_path / "tools"
    tools.mkdir()
    entry = tools / "distccd"
    entry.write_bytes(b"#!/bin/sh\necho distccd\n")
    entry.chmod(0o755)
    built = _cwlite("db", "build", "--db", "/var/lib/cwlite/measure.db", "--from-dir", str(tools),
                    "--trust-set", "toolchain")
    assert built.returncode == 0, built.stderr
    Path("/etc/cwlite/policy.toml").write_text(POLICY.format(pcr=PCR, entry=entry))
    err = tmp_path / "unit.stderr"
    with err.open("w") as stderr:
        service = subprocess.Popen(argv, env=UNIT_ENV, cwd="/", stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        health, presented = _health(time.monotonic() + 300, service)
        assert health["status"] == "ok" and health["pcr"] == PCR
        assert health["tls_spki_sha256"] == presented      # the key it logged is the key it serves with
        assert health["log_length"] >= 2                   # boot_aggregate, tls-key, enforcement's entries
        assert Path("/var/lib/cwlite/measurements.log").stat().st_size > 0
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- unit stderr ---\n{err.read_text()[-3000:]}") from exc
    finally:
        service.send_signal(signal.SIGTERM)                # the unit's KillSignal; TimeoutStopSec=60s
        try:
            rc = service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
            rc = service.wait()
    assert rc == 0, err.read_text()[-3000:]
    # --log-format json: every stderr line is one JSON object (journald), the serve line among them
    records = [json.loads(line) for line in err.read_text().splitlines() if line.strip()]
    assert any(r["msg"].startswith(f"cwlite serve: https://127.0.0.1:{PORT}") for r in records), records[-5:]
