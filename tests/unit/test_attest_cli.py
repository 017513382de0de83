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
from tests.conftest import requires

pytestmark = [requires(tool="swtpm"), pytest.mark.timeout(300)]
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



def _enrol_cli(url, host_dir, vdir):
    cas = sorted(str(p) for p in (host_dir / "swtpm" / "ca").glob("*cert*.pem"))
    r = _run("enrol", url, "build1", "--data-dir", vdir, *sum((["--ek-ca", c] for c in cas), []))
    assert r.returncode == 0, r.stderr


def test_verify_push_policy(tmp_path, reference):
    assert _run("policy", "keygen", str(tmp_path / "controller")).returncode == 0
    active = tmp_path / "active.toml"
    active.write_text(reference.policy_path.read_text())
    proc = subprocess.Popen([*CWLITE, "serve", "--data-dir", str(tmp_path / "host"), "--port", "0",
                             "--policy", str(active), "--controller-key", str(tmp_path / "controller.pub")],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(https://127\.0\.0\.1:\d+)", proc.stderr.readline()).group(1)
        vdir = str(tmp_path / "verifier")
        _enrol_cli(url, tmp_path / "host", vdir)
        common = ["--data-dir", vdir, "--db", str(reference.db_path), "--json"]
        r = _run("verify", "build1", "--policy", str(reference.policy_path), *common)
        before = json.loads(r.stdout)
        assert "reasons" in before, r.stderr
        assert any(r.startswith("active policy none") for r in before["reasons"])

        new = tmp_path / "new.toml"
        new.write_text(reference.policy_path.read_text().replace('mode = "audit"', 'mode = "enforce"'))
        assert _run("policy", "sign", str(new), "--key", str(tmp_path / "controller.key")).returncode == 0
        r = _run("verify", "build1", "--push-policy", str(new), "--policy", str(reference.policy_path), *common)
        assert "loaded pushed policy" in r.stderr, r.stderr
        after = json.loads(r.stdout)
        assert not any("policy" in x for x in after["reasons"]), after["reasons"]
        assert after["policy_digest"] == _run("policy", "digest", str(new)).stdout.strip()
        assert active.read_text() == new.read_text()

        # a policy signed by someone else is refused by the host
        assert _run("policy", "keygen", str(tmp_path / "mallory")).returncode == 0
        evil = tmp_path / "evil.toml"
        evil.write_text(new.read_text().replace('mode = "enforce"', 'mode = "audit"'))
        assert _run("policy", "sign", str(evil), "--key", str(tmp_path / "mallory.key")).returncode == 0
        r = _run("verify", "build1", "--push-policy", str(evil), "--policy", str(new), *common)
        assert r.returncode == 1 and "HTTP 403" in r.stderr and "signature does not verify" in r.stderr
        assert active.read_text() == new.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
