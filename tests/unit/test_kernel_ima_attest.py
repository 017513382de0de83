"""Issue 23 §2 on the host: the kernel's own IMA log served, quoted (PCR 10) and judged entry by entry.

This host's kernel runs no IMA, so a kernel log is written here byte for byte by the independent
encoder of tests/vectors/ima_ng_kernel.py (from the kernel's sources) and its sha256-bank values are
extended into a real swtpm's PCR 10, as the kernel would; cwlite's own log runs on PCR 11. The real
kernel does it end to end in the VM tier (tests/vm/guest/test_kernel_ima_guest.py).
"""
from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core import imalog
from controlplane.core import proof as proof_mod
from controlplane.core.errors import VerifyError
from controlplane.core.policy import load_policy
from controlplane.host import mlog
from controlplane.host.kernel_ima import KernelImaLog
from controlplane.host.tpm import open_tpm
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.judge import Reference
from controlplane.verifier.kernel_ima import KernelImaReference, keylime_policy, load_keylime_policy
from controlplane.verifier.store import Store
from prima.measuredb import MeasureDB
from tests.attest_fixtures import enforcement_started, reference, running_host  # noqa: F401
from tests.conftest import requires
from tests.vectors.ima_ng_kernel import entry as kernel_entry

pytestmark = [requires(tool="swtpm"), pytest.mark.timeout(300)]
CWLITE_PCR, KERNEL_PCR = 11, 10


class FakeKernel:
    """Writes entries as the kernel's IMA does: its binary log file, and each extend into the TPM's PCR 10."""

    def __init__(self, path, tpm) -> None:
        self.path, self.tpm = path, tpm
        path.write_bytes(b"")

    def measure(self, digest: bytes, name: str, *, violation: bool = False) -> None:
        binary, _line, extended = kernel_entry(KERNEL_PCR, "sha256", digest, name, violation)
        with self.path.open("ab") as f:
            f.write(binary)
        self.tpm.extend(KERNEL_PCR, extended)


@pytest.fixture
def site(tmp_path, reference):
    with open_tpm(tmp_path / "tpm") as tpm:
        kernel = FakeKernel(tmp_path / "binary_runtime_measurements", tpm)
        kernel.measure(imalog.boot_aggregate(tpm.read_pcrs(list(range(10)))), "boot_aggregate")
        with mlog.MeasurementLog.open(tmp_path / "m.log", tpm, pcr=CWLITE_PCR) as log, \
                running_host(tmp_path / "host", tpm=tpm, log=log, policy_path=reference.policy_path) as h, \
                Store(f"sqlite:///{tmp_path}/a.db") as store:
            h.state.kernel_ima = KernelImaLog(kernel.path)
            enforcement_started(h, reference)
            yield h, kernel, store


def _ref(reference, tmp_path, allowed: dict[str, bytes]):
    """The verifier's reference with the kernel IMA judge: its DB, a Keylime policy file, an exclude."""
    policy_file = tmp_path / "runtime.json"
    doc = keylime_policy([imalog.LogEntry.new(0, KERNEL_PCR, d, p) for p, d in allowed.items()], excludes=["/var/log/"])
    policy_file.write_text(json.dumps(doc))
    db = MeasureDB.open(reference.db_path)
    return Reference(load_policy(reference.policy_path), db,
                     kernel_ima=KernelImaReference.of(db, load_keylime_policy(policy_file), ["/run/"]))


def test_kernel_entries_are_replayed_and_judged_trusted_unknown_violation(site, reference, tmp_path):
    h, kernel, store = site
    key = Ed25519PrivateKey.generate()
    cc = next(p for p in reference.trusted if p.endswith("/cc"))
    lib = hashlib.sha256(b"libfoo").digest()
    kernel.measure(reference.trusted[cc], "/usr/bin/cc")                        # trusted by the DB (content)
    kernel.measure(lib, "/usr/lib/libfoo.so")                                   # trusted by the Keylime policy
    kernel.measure(hashlib.sha256(b"log").digest(), "/var/log/syslog")          # excluded (policy's excludes)
    kernel.measure(hashlib.sha256(b"run").digest(), "/run/x")                   # excluded (--ima-exclude)
    registrar.enrol(h.url, "b1", store)
    assert store.host("b1").pcr == CWLITE_PCR                                  # taken from the host: 11
    ref = _ref(reference, tmp_path, {"/usr/lib/libfoo.so": lib})
    try:
        first = verifier.attest(store.host("b1"), ref, key, store=store)
        assert first.verdict == "trusted", first.reasons
        k = first.document["kernel_ima"]
        assert (k["pcr"], k["start"], k["end"], k["trusted_entries"], k["excluded_entries"]) == (10, 0, 5, 3, 2)
        assert k["pcr_value"] == h.tpm.read_pcr(KERNEL_PCR).hex() and k["entries"] == []
        proof_mod.check_quote(first.document)                                   # PCR 10 is in the signed quote

        evil = hashlib.sha256(b"evil").digest()
        kernel.measure(evil, "/tmp/evil")                                        # a file outside the DB ran
        kernel.measure(hashlib.sha256(b"trojan").digest(), "/usr/lib/libfoo.so")  # a known file, other content
        kernel.measure(bytes(32), "/etc/shadow", violation=True)                # open-writers: kernel's violation
        second = verifier.attest(store.host("b1"), ref, key, store=store)
        assert second.verdict == "untrusted"
        assert "3 kernel IMA entries not trusted (unknown file or violation)" in second.reasons
        k = second.document["kernel_ima"]
        assert k["start"] == 5 and k["end"] == 8                               # incremental: only what is new
        assert [(e["index"], e["reason"], e["subject"]) for e in k["entries"]] == [
            (5, "unknown", "/tmp/evil"), (6, "violation", "/usr/lib/libfoo.so"), (7, "violation", "/etc/shadow")]
        assert k["entries"][0]["digest"] == evil.hex()

        third = verifier.attest(store.host("b1"), ref, key, store=store)        # nothing new: still untrusted
        assert third.verdict == "untrusted" and third.document["kernel_ima"]["start"] == 8

        # a host that hides a kernel entry cannot reach the quoted PCR 10
        data = kernel.path.read_bytes()
        kernel.measure(hashlib.sha256(b"hidden").digest(), "/tmp/hidden")
        kernel.path.write_bytes(data)
        h.state.kernel_ima = KernelImaLog(kernel.path)
        with pytest.raises(VerifyError) as err:
            verifier.attest(store.host("b1"), ref, key, store=store)
        assert err.value.reason == "pcr-mismatch" and "kernel's IMA log" in str(err.value)
    finally:
        ref.db.close()


def test_a_verifier_that_wants_the_kernel_log_refuses_a_host_that_hides_it(site, reference, tmp_path):
    h, _kernel, store = site
    h.state.kernel_ima = None
    with httpx.Client(verify=False, base_url=h.url) as c:
        assert c.get("/v1/health").json()["ima_pcr"] is None
        r = c.get("/v1/ima-log")
        assert r.status_code == 404 and "keeps no IMA log" in r.json()["error"]
    registrar.enrol(h.url, "b1", store)
    ref = _ref(reference, tmp_path, {})
    try:
        with pytest.raises(VerifyError) as err:
            verifier.attest(store.host("b1"), ref, Ed25519PrivateKey.generate(), store=store)
        assert err.value.reason == "protocol" and "HTTP 404" in str(err.value)
    finally:
        ref.db.close()


def test_a_keylime_runtime_policy_is_read_and_a_malformed_one_named(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"meta": {"version": 1}, "release": 0, "digests": {"/bin/a": ["ab" * 32]},
                                "excludes": ["/tmp/.*"], "keyrings": {}, "ima": {"ignored_keyrings": [],
                                "log_hash_alg": "sha1", "dm_policy": None}, "ima-buf": {}, "verification-keys": ""}))
    p = load_keylime_policy(good)
    assert p.digests == {"/bin/a": frozenset({bytes.fromhex("ab" * 32)})} and p.excludes == ("/tmp/.*",)
    for doc, field in [({"meta": {"version": 2}, "digests": {}}, "meta.version"),
                       ({"meta": {"version": 1}, "digests": {"/a": ["zz"]}}, "digests./a"),
                       ({"meta": {"version": 1}, "digests": {}, "excludes": ["("]}, "excludes")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        with pytest.raises(VerifyError) as err:
            load_keylime_policy(bad)
        assert err.value.reason == "runtime-policy" and str(err.value).startswith(f"{bad}: {field}")


def test_verify_cli_kernel_ima_options(tmp_path, reference):
    """`cwlite verify --ima-policy/--kernel-ima`: a malformed policy is one line naming it; a host serving no
    kernel log is refused (the verifier asked for it), not passed."""
    import re
    import signal
    import subprocess
    import sys

    cwlite = [sys.executable, "-m", "controlplane.cli"]
    proc = subprocess.Popen([*cwlite, "serve", "--data-dir", str(tmp_path / "host"), "--port", "0",
                             "--kernel-ima-log", "none"], stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(https://127\.0\.0\.1:\d+)", proc.stderr.readline()).group(1)
        vdir = ["--data-dir", str(tmp_path / "verifier")]
        assert subprocess.run([*cwlite, "enrol", url, "b1", *vdir], capture_output=True).returncode == 0
        common = [*vdir, "--policy", str(reference.policy_path), "--db", str(reference.db_path)]
        bad = tmp_path / "runtime.json"
        bad.write_text('{"meta": {"version": 1}, "digests": []}')
        r = subprocess.run([*cwlite, "verify", "b1", *common, "--ima-policy", str(bad)], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.strip() == f"cwlite: error: {bad}: digests: expected an object {{path: [hex digest, ...]}}"
        r = subprocess.run([*cwlite, "verify", "b1", *common, "--kernel-ima"], capture_output=True, text=True)
        assert r.returncode == 1 and "REFUSED (malformed)" in r.stderr and "the kernel IMA's PCR" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    # a host that keeps cwlite's log on 11 but serves no kernel log: refused, never passed without it
    proc = subprocess.Popen([*cwlite, "serve", "--data-dir", str(tmp_path / "host2"), "--port", "0", "--pcr", "11",
                             "--kernel-ima-log", "none"], stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(https://127\.0\.0\.1:\d+)", proc.stderr.readline()).group(1)
        assert subprocess.run([*cwlite, "enrol", url, "b2", *vdir], capture_output=True).returncode == 0
        r = subprocess.run([*cwlite, "verify", "b2", *common, "--kernel-ima", "--ima-exclude", "/var/log/"],
                           capture_output=True, text=True)
        assert r.returncode == 1 and "REFUSED (protocol)" in r.stderr and "/v1/ima-log: HTTP 404" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
