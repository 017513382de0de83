"""The attestation commands as an operator runs them: cwlite serve | enrol | verify | proof check."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.attest_fixtures import reference  # noqa: F401

pytestmark = pytest.mark.timeout(300)
CWLITE = [sys.executable, "-m", "controlplane.cli"]


@pytest.fixture
def served(tmp_path):
    proc = subprocess.Popen([*CWLITE, "serve", "--data-dir", str(tmp_path / "host"), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"(https://127\.0\.0\.1:\d+)", line)
        assert m, line
        yield m.group(1), tmp_path / "host"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def _run(*args):
    return subprocess.run([*CWLITE, *args], capture_output=True, text=True, timeout=120)


def test_serve_enrol_verify_watch_and_check_the_proof(served, tmp_path, reference):
    url, host_dir = served
    vdir = str(tmp_path / "verifier")
    cas = sorted(str(p) for p in (host_dir / "swtpm" / "ca").glob("*cert*.pem"))
    r = _run("enrol", url, "build1", "--data-dir", vdir, *sum((["--ek-ca", c] for c in cas), []), "--json",
             "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ek_certificate"] is True

    common = ["--data-dir", vdir, "--policy", str(reference.policy_path), "--db", str(reference.db_path)]
    proof = tmp_path / "build1.proof"
    r = _run("verify", "build1", *common, "--json", "--proof-out", str(proof))
    # a bare service: no enforcement ever started on this host, so it cannot be trusted
    assert r.returncode == 2, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "untrusted" and any("enforcement not running" in x for x in doc["reasons"])
    assert doc["log"]["end"] == 2        # boot_aggregate, tls-key

    pub = os.path.join(vdir, "verifier.pub")
    assert _run("proof", "check", str(proof), "--key", pub).returncode == 0
    data = bytearray(proof.read_bytes())
    data[data.index(b'"end":2') + 6] = ord("1")
    proof.write_bytes(bytes(data))
    r = _run("proof", "check", str(proof), "--key", pub)
    assert r.returncode == 1 and "signature: does not verify" in r.stderr

    r = _run("verify", "--watch", "--rounds", "3", *common, "--json")
    rounds = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["state"] for x in rounds] == ["untrusted"] * 3
    assert [x["proof"]["log"]["start"] for x in rounds] == [2, 2, 2]     # incremental: nothing new

    r = _run("verify", "nosuch", *common)
    assert r.returncode == 1 and "'nosuch' is not enrolled" in r.stderr
