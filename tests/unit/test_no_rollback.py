"""Issue 23 §4: no policy rollback, no silent success (real swtpm, real HTTPS on loopback, real processes)."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core import proof as proof_mod
from controlplane.core.errors import PolicyError, PolicyReason, VerifyError
from controlplane.core.events import EventKind
from controlplane.core.policy import load_policy, parse_policy, sign_policy
from controlplane.host.policy_floor import admit, read_floor
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.store import Store
from prima.kernelview import kernel_dev
from prima.measure import measure_evidence
from tests.attest_fixtures import enforcement_started, reference, running_host  # noqa: F401
from tests.conftest import requires

CWLITE = [sys.executable, "-m", "controlplane.cli"]
POLICY = 'mode = "audit"\ntrust_sets = ["t"]\n[labels.tp]\nentrypoints = ["/usr/bin/true"]\ntrust_set = "t"\n'


def _run(*args, timeout=120):
    return subprocess.run([*CWLITE, *args], capture_output=True, text=True, timeout=timeout)


# -- the policy's serial and expiry are signed; the host keeps a floor ---------------------------
def test_serial_and_expires_are_inside_the_digest_and_absent_ones_keep_old_digests():
    bare = parse_policy(POLICY, source="p.toml")
    seven = parse_policy("serial = 7\n" + POLICY, source="p.toml")
    assert bare.serial == 0 and "serial" not in bare.canonical()          # old signatures still verify
    assert seven.serial == 7 and seven.digest() != bare.digest()
    later = parse_policy("serial = 7\nexpires = 2030-01-01T00:00:00+01:00\n" + POLICY, source="p.toml")
    assert later.canonical()["expires"] == "2029-12-31T23:00:00Z" and later.digest() != seven.digest()
    with pytest.raises(PolicyError, match=r"p.toml:1: expires: .*without a UTC offset"):
        parse_policy("expires = 2030-01-01T00:00:00\n" + POLICY, source="p.toml")
    with pytest.raises(PolicyError, match=r"p.toml:1: serial: -1 is not a serial"):
        parse_policy("serial = -1\n" + POLICY, source="p.toml")


def test_the_host_refuses_an_older_or_expired_policy_and_the_floor_survives(tmp_path):
    data = tmp_path / "data"
    admit(parse_policy("serial = 5\n" + POLICY, source="v5.toml"), data)
    assert read_floor(data) == 5
    with pytest.raises(PolicyError) as err:
        admit(parse_policy("serial = 4\n" + POLICY, source="v4.toml"), data)
    assert err.value.reason is PolicyReason.ROLLBACK and "v4.toml: serial: 4 is older than serial 5" in str(err.value)
    with pytest.raises(PolicyError) as err:
        admit(parse_policy(POLICY, source="none.toml"), data)                  # no serial = 0: older too
    assert err.value.reason is PolicyReason.ROLLBACK
    admit(parse_policy("serial = 5\n" + POLICY, source="again.toml"), data)  # the same serial: a restart
    old = parse_policy("serial = 9\nexpires = 2020-01-01T00:00:00Z\n" + POLICY, source="old.toml")
    with pytest.raises(PolicyError) as err:
        admit(old, data)
    assert err.value.reason is PolicyReason.EXPIRED and read_floor(data) == 5
    (data / "policy.serial").write_text("garbage")
    with pytest.raises(PolicyError, match="unreadable policy serial record"):   # fail closed, never "0"
        read_floor(data)


def test_serve_refuses_a_replayed_older_signed_policy_across_restarts(tmp_path):
    """A real `cwlite serve` with a controller key: a push of serial 2 raises the floor; after a restart
    the genuinely signed serial-1 policy is refused at start, and its push is refused with 409."""
    assert _run("policy", "keygen", str(tmp_path / "ctl")).returncode == 0
    v1, v2 = tmp_path / "v1.toml", tmp_path / "v2.toml"
    v1.write_text("serial = 1\n" + POLICY)
    v2.write_text("serial = 2\n" + POLICY.replace("audit", "enforce"))
    for p in (v1, v2):
        assert _run("policy", "sign", str(p), "--key", str(tmp_path / "ctl.key")).returncode == 0
    active = tmp_path / "active.toml"
    active.write_text(v1.read_text())
    (tmp_path / "active.toml.sig").write_bytes((tmp_path / "v1.toml.sig").read_bytes())
    data = tmp_path / "host"
    serve = [*CWLITE, "serve", "--data-dir", str(data), "--port", "0", "--policy", str(active),
             "--controller-key", str(tmp_path / "ctl.pub")]

    def push(url, path):
        import httpx
        body = {"policy": path.read_text(), "signature": (path.parent / (path.name + ".sig")).read_text().strip()}
        with httpx.Client(verify=False) as c:
            return c.post(f"{url}/v1/policy", json=body)

    proc = subprocess.Popen(serve, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(https://127\.0\.0\.1:\d+)", proc.stderr.readline()).group(1)
        assert push(url, v2).status_code == 200
        r = push(url, v1)
        assert r.status_code == 409 and "serial: 1 is older than serial 2" in r.json()["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert read_floor(data) == 2
    active.write_text(v1.read_text())                                        # an attacker puts v1 back
    (tmp_path / "active.toml.sig").write_bytes((tmp_path / "v1.toml.sig").read_bytes())
    r = subprocess.run(serve, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "serial: 1 is older than serial 2" in r.stderr and "rollback" in r.stderr


@requires(tool="swtpm")
def test_the_verifier_refuses_a_policy_older_than_one_it_proved_for_the_host(tmp_path, reference):
    key = Ed25519PrivateKey.generate()
    newer = tmp_path / "newer.toml"
    newer.write_text("serial = 3\n" + reference.policy_path.read_text())
    older = tmp_path / "older.toml"
    older.write_text("serial = 2\n" + reference.policy_path.read_text())
    with running_host(tmp_path / "host", policy_path=newer) as h, Store(f"sqlite:///{tmp_path}/a.db") as store:
        enforcement_started(h, dataclasses.replace(reference, policy_path=newer))
        registrar.enrol(h.url, "b1", store)
        ref = reference.open()
        try:
            first = verifier.attest(store.host("b1"), dataclasses.replace(ref, policy=load_policy(newer)), key,
                                    store=store)
            assert first.verdict == "trusted", first.reasons
            assert first.document["policy_serial"] == 3 and store.policy_serial("b1") == 3
            with pytest.raises(VerifyError) as err:
                verifier.attest(store.host("b1"), dataclasses.replace(ref, policy=load_policy(older)), key,
                                store=store)
            assert err.value.reason == "policy-rollback" and "serial 2, older than serial 3" in str(err.value)
            assert store.verdicts("b1", limit=1)[0].reason == "policy-rollback"      # recorded, not silent
        finally:
            ref.db.close()


# -- watch: concurrent, and honest about the exit status ------------------------------------------
class _Stall:
    """A TCP server that accepts and never answers: a hung host."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@requires(tool="swtpm")
def test_watch_attests_hosts_concurrently_so_a_hung_host_delays_nobody(tmp_path, reference):
    key = Ed25519PrivateKey.generate()
    stall = _Stall()
    with running_host(tmp_path / "host", policy_path=reference.policy_path) as h, \
            Store(f"sqlite:///{tmp_path}/a.db") as store:
        enforcement_started(h, reference)
        good = registrar.enrol(h.url, "good", store, interval_s=0.1)
        store.enrol(dataclasses.replace(good, name="hung", url=stall.url))  # same pins, a host that never answers
        ref = reference.open()

        async def collect():
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            got = [(name, r) async for name, r in verifier.watch(store, ref, key, hosts=["hung", "good"], rounds=4)]
            return got, loop.time() - t0

        try:
            got, seconds = asyncio.run(collect())
        finally:
            ref.db.close()
            stall.close()
    # one after the other, the first round would wait out the hung host's 30 s timeout
    assert [n for n, _ in got] == ["good"] * 4 and all(r.verdict == "trusted" for _, r in got)
    assert seconds < 20, seconds


def test_watch_exits_non_zero_when_a_host_is_untrusted(tmp_path, reference):
    """The CLI: a bare service is never trusted (no enforcement): --watch --rounds 2 must exit 2, not 0."""
    proc = subprocess.Popen([*CWLITE, "serve", "--data-dir", str(tmp_path / "host"), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(https://127\.0\.0\.1:\d+)", proc.stderr.readline()).group(1)
        vdir = str(tmp_path / "verifier")
        r = _run("enrol", url, "b1", "--data-dir", vdir, "--interval", "0.1", "--json")
        assert r.returncode == 0, r.stderr
        r = _run("verify", "--watch", "--rounds", "2", "--data-dir", vdir, "--policy", str(reference.policy_path),
                 "--db", str(reference.db_path), "--json")
        assert r.returncode == 2, r.stderr
        assert [json.loads(x)["state"] for x in r.stdout.splitlines()] == ["untrusted"] * 2
        assert "not trusted at the last round: b1" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# -- operator commands and what enrol says --------------------------------------------------------
def test_hosts_list_proofs_remove_and_enrol_warnings(tmp_path, reference):
    proc = subprocess.Popen([*CWLITE, "serve", "--data-dir", str(tmp_path / "host"), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(https://127\.0\.0\.1:\d+)", proc.stderr.readline()).group(1)
        vdir = ["--data-dir", str(tmp_path / "verifier")]
        r = _run("enrol", url, "b1", *vdir, "--json")
        assert r.returncode == 0 and "EK trusted on first use: no --ek-ca" in r.stderr
        assert json.loads(r.stdout)["ek_ca_checked"] is False
        r = _run("enrol", url, "b2", *vdir, "--json")                        # the same TPM, a new name
        assert "this EK is already enrolled as b1" in r.stderr and json.loads(r.stdout)["also_enrolled_as"] == ["b1"]
        _run("verify", "b1", *vdir, "--policy", str(reference.policy_path), "--db", str(reference.db_path))
        listed = json.loads(_run("hosts", "list", *vdir, "--json").stdout)["hosts"]
        assert [(x["name"], x["last_verdict"]) for x in listed] == [("b1", "untrusted"), ("b2", None)]
        proofs = json.loads(_run("hosts", "proofs", "b1", *vdir, "--json").stdout)
        assert len(proofs) == 1 and proofs[0]["proof"]["host"]["name"] == "b1"
        assert "b1: last 1 verdict(s)" in _run("hosts", "proofs", "b1", *vdir).stdout
        assert json.loads(_run("hosts", "remove", "b2", *vdir, "--json").stdout) == {"removed": "b2"}
        assert [x["name"] for x in json.loads(_run("hosts", "list", *vdir, "--json").stdout)["hosts"]] == ["b1"]
        r = _run("hosts", "remove", "b2", *vdir)
        assert r.returncode == 1 and "'b2' is not enrolled" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# -- proofs: JCS, and numbers any JSON tool reads exactly ------------------------------------------
def test_an_independent_jcs_library_rederives_the_signed_bytes():
    key = Ed25519PrivateKey.generate()
    doc = {"quote_info": {"firmware_version": str(2**63 + 5), "clock": 2**53 - 1}, "verdict": "trusted",
           "host": {"name": "b\u00e9\u20ac\U0001f600\ufb01"}, "reasons": ["tab\there", "ctl\x01", "quote\"/\\"],
           "keys": {"\U0001f600": 1, "\ufb01": 2, "a": 3, "B": 4}, "empty": {}, "list": [], "t": True, "n": None}
    data = proof_mod.sign(doc, key)
    checked = proof_mod.check(data, key.public_key())
    assert data == rfc8785.dumps(checked) + b"\n"                          # the whole file is JCS
    body = {k: v for k, v in checked.items() if k != "signature"}
    key.public_key().verify(base64.b64decode(checked["signature"]), rfc8785.dumps(body))   # and so is what is signed
    with pytest.raises(ValueError, match="wider than 2\\^53"):
        proof_mod.canonical({"firmware_version": 2**63})
    with pytest.raises(ValueError, match="float"):
        proof_mod.canonical({"x": 1.5})


@requires(tool="swtpm")
def test_a_real_proof_is_jcs_and_carries_firmware_version_as_a_string(tmp_path, reference):
    key = Ed25519PrivateKey.generate()
    with running_host(tmp_path / "host", policy_path=reference.policy_path) as h, \
            Store(f"sqlite:///{tmp_path}/a.db") as store:
        enforcement_started(h, reference)
        registrar.enrol(h.url, "b1", store)
        ref = reference.open()
        try:
            att = verifier.attest(store.host("b1"), ref, key, store=store)
        finally:
            ref.db.close()
    fw = att.document["quote_info"]["firmware_version"]
    assert isinstance(fw, str) and int(fw) > 0
    assert att.proof == rfc8785.dumps(json.loads(att.proof)) + b"\n"
    assert att.document["format"] == "cwlite-proof/2"


def test_a_legacy_proof_still_checks():
    key = Ed25519PrivateKey.generate()
    body = {"format": "cwlite-proof/1", "verdict": "trusted", "host": {"name": "h"}, "quote_info": {"firmware_version": 2**62},
            "verifier_key": proof_mod.key_id(key.public_key())}
    legacy = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["signature"] = base64.b64encode(key.sign(legacy)).decode()
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    assert proof_mod.check(data, key.public_key())["quote_info"]["firmware_version"] == 2**62


# -- the SHA-256 a violation entry records ----------------------------------------------------------
def test_evidence_is_read_through_the_process_and_only_for_the_kernels_file(tmp_path):
    """The file is opened through the process that holds it, even once its path is gone; a path now naming
    another file is not measured in its place; nothing left: None (the entry says unknown)."""
    f = tmp_path / "payload"
    f.write_bytes(b"\x7fELF not really" * 1000)
    want = hashlib.sha256(f.read_bytes()).digest()
    st = os.stat(f)
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(f)!r}, 'rb'); import time; time.sleep(60)"])
    try:
        for _ in range(100):
            if any(os.path.realpath(p.path) == str(f) for p in os.scandir(f"/proc/{holder.pid}/fd")):
                break
            threading.Event().wait(0.05)
        args = (kernel_dev(st.st_dev), st.st_ino, st.st_ctime_ns)
        assert measure_evidence(holder.pid, *args, str(f), kernel_dev=kernel_dev) == want
        f.unlink()
        f.write_bytes(b"something else")                                 # the path now names another file
        assert measure_evidence(holder.pid, *args, str(f), kernel_dev=kernel_dev) == want   # via /proc/PID/fd
        assert measure_evidence(0, *args, str(f), kernel_dev=kernel_dev) is None           # the path alone: no
        assert measure_evidence(holder.pid, *args, str(f), kernel_dev=kernel_dev, max_bytes=10) is None
    finally:
        holder.kill()
        holder.wait()
    assert measure_evidence(holder.pid, *args, str(f), kernel_dev=kernel_dev) is None      # gone: unknown


def test_proof_views_print_each_violations_full_digest_or_unknown(tmp_path):
    key = Ed25519PrivateKey.generate()
    sha = hashlib.sha256(b"what ran").hexdigest()
    entries = [{"index": 7, "verdict": "untrusted", "reason": "violation", "kind": "violation", "label": "tp",
                "op": "exec", "subject": "/tmp/evil", "digest": sha},
               {"index": 9, "verdict": "untrusted", "reason": "violation", "kind": "violation", "label": "tp",
                "op": "exec", "subject": "/tmp/gone", "digest": "0" * 64}]
    p = tmp_path / "p.json"
    p.write_bytes(proof_mod.sign({"host": {"name": "h"}, "log": {}, "entries": entries, "verdict": "untrusted"}, key))
    out = _run("proof", "show", str(p)).stdout
    assert f"entry 7: /tmp/evil: sha256 {sha}" in out
    assert "entry 9: /tmp/gone: sha256 unknown (the file was gone or changed" in out
