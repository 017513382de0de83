"""Enrolment, attestation rounds and proofs over real HTTPS on loopback with real swtpm TPMs.

Each tamper case swaps one real part for what a compromised host or a network
attacker could present, and asserts the verifier's refusal reason.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import os

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core import proof as proof_mod
from controlplane.core.errors import VerifyError
from controlplane.core.events import EventKind
from controlplane.core.keys import load_public_key, public_pem
from controlplane.core.policy import load_policy, sign_policy
from controlplane.host.tpm import open_tpm
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.store import Store
from tests.attest_fixtures import Relay, enforcement_started, reference, running_host  # noqa: F401
from tests.conftest import requires
from tests.pg_fixtures import new_database, postgres_url  # noqa: F401

_DBS = itertools.count()

pytestmark = [requires(tool="swtpm"), pytest.mark.timeout(300)]


@pytest.fixture
def store(tmp_path):
    with Store.open(f"sqlite:///{tmp_path / 'attest.db'}") as s:
        yield s


@pytest.fixture
def pg_store(postgres_url):
    """The store on the real PostgreSQL server (a fleet of verifiers shares one), in a fresh database."""
    name = f"attest_{os.getpid()}_{next(_DBS)}"
    with Store.open(new_database(postgres_url, name)) as s:
        yield s


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def host(tmp_path, reference):
    with running_host(tmp_path / "host", policy_path=reference.policy_path) as h:
        enforcement_started(h, reference)
        yield h


def _cas(host):
    return registrar.load_cas(sorted((host.data_dir / "swtpm" / "ca").glob("*cert*.pem")))


def _enrol(host, store, name="build1"):
    return registrar.enrol(host.url, name, store, cas=_cas(host))


def _attest(store, reference, key, name="build1", **kw):
    ref = reference.open(kw.pop("extra", frozenset()))
    try:
        return verifier.attest(store.host(name), ref, key, store=store, **kw)
    finally:
        ref.db.close()


# -- enrolment -------------------------------------------------------------------------------
def test_enrol_checks_the_ek_chain_and_pins_ek_and_ak(host, store):
    h = _enrol(host, store)
    assert h.ek_public == host.tpm.ek_public() and h.ak_public == host.tpm.ak_public()
    assert h.ek_cert == host.tpm.ek_certificate() and h.ek_cert


def test_enrol_refuses_an_ek_certificate_from_another_ca(host, store, tmp_path):
    with open_tpm(tmp_path / "other") as other:
        other.ek_public()
        other_cas = registrar.load_cas(sorted((tmp_path / "other" / "swtpm" / "ca").glob("*cert*.pem")))
    with pytest.raises(VerifyError) as exc:
        registrar.enrol(host.url, "build1", store, cas=other_cas)
    assert exc.value.reason == "ek-cert" and "no trusted CA issued" in str(exc.value)
    assert store.hosts() == []


class _SplitTpm:
    """A host claiming TPM A's EK (and its genuine certificate) with TPM B's AK."""

    def __init__(self, ek_tpm, ak_tpm) -> None:
        self.ek_tpm, self.ak_tpm = ek_tpm, ak_tpm

    def ek_public(self):
        return self.ek_tpm.ek_public()

    def ek_certificate(self):
        return self.ek_tpm.ek_certificate()

    def ak_public(self):
        return self.ak_tpm.ak_public()

    def ak_name(self):
        return self.ak_tpm.ak_name()

    def activate_credential(self, blob, secret):
        return self.ek_tpm.activate_credential(blob, secret)

    def quote(self, qd, pcrs):
        return self.ak_tpm.quote(qd, pcrs)


@pytest.mark.parametrize("activating", ["ek-tpm", "ak-tpm"])
def test_an_ak_from_another_tpm_is_refused(host, store, tmp_path, activating):
    with open_tpm(tmp_path / "other") as other:
        split = _SplitTpm(host.tpm, other)
        if activating == "ak-tpm":
            split.activate_credential = other.activate_credential
        host.state.tpm = split
        with pytest.raises(VerifyError) as exc:
            _enrol(host, store)
    assert exc.value.reason == "activation"
    assert store.hosts() == []


# -- a trusted host, then untrusted events ------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_trusted_proof_then_a_violation_is_named(host, key, reference, tmp_path, request, backend):
    store = request.getfixturevalue("store" if backend == "sqlite" else "pg_store")
    _enrol(host, store)
    cc = next(p for p in reference.trusted if p.endswith("/cc"))
    host.record(EventKind.LABEL_TRANSITION, reference.trusted[reference.entry], label="tp_build", op="exec",
                subject=reference.entry)
    host.record(EventKind.TRUSTED_LOAD, reference.trusted[cc], label="tp_build", op="exec", subject=cc)
    first = _attest(store, reference, key)
    assert first.verdict == "trusted", first.reasons
    assert first.document["entries"] == [] and first.log_start == 0 and first.log_end == len(host.log.entries(0))
    pub = tmp_path / "v.pub"
    pub.write_bytes(public_pem(key.public_key()))
    assert proof_mod.check(first.proof, load_public_key(pub))["verdict"] == "trusted"

    evil = bytes.fromhex("66" * 32)
    host.record(EventKind.VIOLATION, evil, label="tp_build", op="exec", subject="/tmp/evil_x")
    host.record(EventKind.TRUSTED_LOAD, b"\x77" * 32, label="tp_build", op="mmap", subject="/tmp/libevil.so")
    second = _attest(store, reference, key)
    assert second.verdict == "untrusted"
    assert second.log_start == first.log_end                    # incremental: only the new entries
    named = [(e["index"], e["reason"], e["subject"]) for e in second.document["entries"]]
    assert named == [(first.log_end, "violation", "/tmp/evil_x"), (first.log_end + 1, "not-in-db", "/tmp/libevil.so")]
    # the host stays untrusted in later rounds, though nothing new happened but the engine's liveness entry
    third = _attest(store, reference, key)
    assert third.verdict == "untrusted" and third.log_start == second.log_end and third.log_end == second.log_end + 1
    verdicts = store.verdicts("build1")
    assert [v.verdict for v in verdicts] == ["untrusted", "untrusted", "trusted"]
    assert store.proof(verdicts[1].proof_id).encode() == second.proof


def test_the_quote_inside_a_proof_is_checked_offline(host, store, key, reference):
    _enrol(host, store)
    first, second = _attest(store, reference, key), _attest(store, reference, key)
    for att in (first, second):
        proof_mod.check_quote(att.document)
    # a verifier (or anyone holding its key) pasting another round's quote into a proof
    forged = dict(second.document, quote=first.document["quote"])
    doc = proof_mod.check(proof_mod.sign(forged, key), key.public_key())
    with pytest.raises(VerifyError) as exc:
        proof_mod.check_quote(doc)
    assert exc.value.reason == "proof-quote" and "qualifying data" in str(exc.value).lower() or \
        exc.value.reason == "proof-quote"


def test_a_log_not_started_on_the_quoted_boot_pcrs_is_untrusted(host, store, key, reference):
    _enrol(host, store)
    host.tpm.extend(5, b"\x55" * 32)        # PCRs 0-9 no longer what the log's boot_aggregate recorded
    att = _attest(store, reference, key)
    assert att.verdict == "untrusted"
    assert [(e["index"], e["reason"]) for e in att.document["entries"]] == [(0, "boot-aggregate")]


def test_enforcement_gap_and_lost_events_are_flagged(host, store, key, reference):
    _enrol(host, store)
    assert _attest(store, reference, key).verdict == "trusted"
    host.record(EventKind.LOST_EVENTS, subject="ring buffer: 3 lost")
    enforcement_started(host, reference)                        # a second daemon start
    att = _attest(store, reference, key)
    assert att.verdict == "untrusted"
    assert [e["reason"] for e in att.document["entries"]] == ["lost-events", "enforcement-gap"]


def test_a_modified_policy_on_the_host_is_untrusted(tmp_path, store, key, reference):
    modified = tmp_path / "modified.toml"
    modified.write_text(reference.policy_path.read_text().replace('mode = "audit"', 'mode = "enforce"'))
    with running_host(tmp_path / "host", policy_path=modified) as h:
        enforcement_started(h, dataclasses.replace(reference, policy_path=modified))
        _enrol(h, store)
        att = _attest(store, reference, key)
    assert att.verdict == "untrusted"
    assert [e["reason"] for e in att.document["entries"]] == ["policy"]
    assert any("is not the verifier's" in r for r in att.reasons)


# -- refusals -----------------------------------------------------------------------------------
class _ReplayingLog:
    """A host that answers every quote request with the first quote it made (an old nonce)."""

    def __init__(self, log) -> None:
        self.log, self.first = log, None

    def quote(self, qd, pcrs):
        if self.first is None:
            self.first = self.log.quote(qd, pcrs)[0]
        return self.first, self.log.entries(0)

    def __getattr__(self, name):
        return getattr(self.log, name)


class _QuotedBy:
    """A host whose quotes come from another TPM than the enrolled one."""

    def __init__(self, log, tpm) -> None:
        self.log, self.tpm = log, tpm

    def quote(self, qd, pcrs):
        return self.tpm.quote(qd, pcrs), self.log.entries(0)

    def __getattr__(self, name):
        return getattr(self.log, name)


def _refused(store, reference, key) -> VerifyError:
    with pytest.raises(VerifyError) as exc:
        _attest(store, reference, key)
    assert store.verdicts("build1")[0].verdict == "error"
    assert store.verdicts("build1")[0].reason == exc.value.reason
    return exc.value


def test_replayed_quote_is_refused(host, store, key, reference):
    _enrol(host, store)
    host.state.mlog = _ReplayingLog(host.log)
    assert _attest(store, reference, key).verdict == "trusted"   # the first quote is fresh
    assert _refused(store, reference, key).reason == "nonce"


def test_quote_from_another_tpm_is_refused(host, store, key, reference, tmp_path):
    _enrol(host, store)
    with open_tpm(tmp_path / "other") as other:
        host.state.mlog = _QuotedBy(host.log, other)
        assert _refused(store, reference, key).reason == "signature"


class _EditedLog:
    """The host's log as a compromised host would serve it: one entry dropped or two swapped."""

    def __init__(self, log, *, drop: int | None = None, swap: tuple[int, int] | None = None) -> None:
        self.log, self.drop, self.swap = log, drop, swap

    def entries(self, start: int = 0):
        es = list(self.log.entries(0))
        if self.drop is not None:
            del es[self.drop]
        if self.swap is not None:
            i, j = self.swap
            es[i], es[j] = es[j], es[i]
        return es[start:]

    def quote(self, qd, pcrs):
        q, _ = self.log.quote(qd, pcrs)
        return q, self.entries(0)

    def record(self, event):
        return self.log.record(event)


@pytest.mark.parametrize("edit", [{"drop": 5}, {"swap": (5, 6)}])
def test_log_with_entry_removed_or_reordered_is_refused(host, store, key, reference, edit):
    _enrol(host, store)
    host.record(EventKind.VIOLATION, b"\x66" * 32, label="tp_build", op="exec", subject="/tmp/evil")
    host.record(EventKind.TRUSTED_LOAD, b"\x67" * 32, label="tp_build", op="exec", subject="/tmp/other")
    assert host.log.entries(0)[5].name.startswith("cwlite:violation")
    host.state.mlog = _EditedLog(host.log, **edit)
    assert _refused(store, reference, key).reason == "pcr-mismatch"


def test_a_relay_with_another_tls_key_is_refused(host, store, key, reference):
    _enrol(host, store)
    with Relay(host.server.port) as relay:
        host_row = store.host("build1")
        store.enrol(dataclasses.replace(host_row, url=relay.url))
        err = _refused(store, reference, key)
    assert err.reason == "tls-key" and "man in the middle" in str(err)


def test_reboot_is_flagged_then_the_new_boot_is_judged(tmp_path, store, key, reference):
    with running_host(tmp_path / "host", policy_path=reference.policy_path) as h:
        enforcement_started(h, reference)
        _enrol(h, store)
        assert _attest(store, reference, key).verdict == "trusted"
    # same TPM state, restarted (TPM reset: PCRs cleared, reset count up), a fresh log
    (tmp_path / "host" / "measurements.log").unlink()
    with running_host(tmp_path / "host", policy_path=reference.policy_path) as h:
        enforcement_started(h, reference)
        store.enrol(dataclasses.replace(store.host("build1"), url=h.url))
        att = _attest(store, reference, key)
        assert att.verdict == "untrusted" and att.reasons[0].startswith("reboot")
        assert att.log_start == 0
        assert _attest(store, reference, key).verdict == "trusted"


# -- policy push over the attested channel --------------------------------------------------------
def test_signed_policy_push_is_loaded_and_logged_forged_one_refused(tmp_path, store, key, reference):
    controller = Ed25519PrivateKey.generate()
    active = tmp_path / "active.toml"
    active.write_text(reference.policy_path.read_text())
    with running_host(tmp_path / "host", policy_path=active, controller_key=controller.public_key()) as h:
        enforcement_started(h, reference)
        _enrol(h, store)
        assert _attest(store, reference, key).verdict == "trusted"
        new_text = reference.policy_path.read_text().replace('mode = "audit"', 'mode = "enforce"')
        new = tmp_path / "new.toml"
        new.write_text(new_text)
        new_policy = load_policy(new)
        good_sig = sign_policy(new_policy, controller)

        n_before = len(h.log.entries(0))
        old_sig = sign_policy(load_policy(reference.policy_path), controller)   # a signature of another policy
        with pytest.raises(VerifyError, match="HTTP 403: pushed policy.sig: signature does not verify"):
            verifier.push_policy(store.host("build1"), new_text, old_sig)
        assert len(h.log.entries(0)) == n_before and active.read_text() == reference.policy_path.read_text()
        # 403 vs 422 is decided by PolicyError.reason: a bad signature is forbidden, a bad policy unprocessable
        with _client(h) as c:
            r = c.post("/v1/policy", json={"policy": new_text, "signature": base64.b64encode(b"x" * 10).decode()})
            assert r.status_code == 403 and r.json()["error"].startswith("pushed policy.sig: signature malformed")
            r = c.post("/v1/policy", json={"policy": new_text + "bogus = 1\n",
                                           "signature": base64.b64encode(good_sig).decode()})
            assert r.status_code == 422 and "bogus: unknown key" in r.json()["error"]
            r = c.post("/v1/policy", json={"policy": "mode = [", "signature": base64.b64encode(good_sig).decode()})
            assert r.status_code == 422 and r.json()["error"].startswith("pushed policy: TOML syntax")
        assert len(h.log.entries(0)) == n_before

        answer = verifier.push_policy(store.host("build1"), new_text, good_sig)
        assert answer["policy_digest"] == new_policy.digest().hex()
        with _client(h) as c:
            served = c.get("/v1/policy").json()
        assert (served["policy"], served["policy_digest"], served["mode"]) == (new_text, answer["policy_digest"],
                                                                             "enforce")
        last = h.log.entries(0)[-1]
        assert last.name.startswith("cwlite:policy-load:") and last.digest == new_policy.digest()
        assert load_policy(active).digest() == new_policy.digest()
        # the verifier, now holding the new policy and accepting the old one's earlier load
        old_digest = load_policy(reference.policy_path).digest()
        att = _attest(store, dataclasses.replace(reference, policy_path=new), key, extra=frozenset({old_digest}))
        assert att.verdict == "trusted", att.reasons
        # a verifier still on the old policy sees the host running another one
        assert _attest(store, reference, key, full=True).verdict == "untrusted"


def test_policy_push_to_an_unattested_key_is_refused(host, store):
    _enrol(host, store)      # enrolled but never attested: no verified TLS key yet
    with pytest.raises(VerifyError) as exc:
        verifier.push_policy(store.host("build1"), "mode = 'audit'\n", bytes(64))
    assert exc.value.reason == "tls-key"


# -- the service's input bounds -------------------------------------------------------------------
@contextlib.contextmanager
def _client(host):
    with httpx.Client(base_url=host.url, verify=False, timeout=30) as c:
        yield c


@pytest.mark.parametrize("body, status, message", [
    ({"nonce": "zz" * 16, "pcrs": [10]}, 422, "nonce: String should match pattern"),
    ({"nonce": "ab" * 8, "pcrs": [10]}, 422, "nonce: String should match pattern"),
    ({"nonce": "ab" * 65, "pcrs": [10]}, 422, "nonce: String should match pattern"),
    ({"nonce": "ab" * 16, "pcrs": [24]}, 422, "pcrs.0: Input should be less than or equal to 23"),
    ({"nonce": "ab" * 16, "pcrs": [10, 10]}, 422, "pcrs: Value error, PCR indices must be unique"),
    ({"nonce": "ab" * 16, "pcrs": [7]}, 422, "pcrs: must include the measurement-log PCR 10"),
    ({"nonce": "ab" * 16, "pcrs": ["10"]}, 422, "pcrs.0: Input should be a valid integer"),
    ({"nonce": "ab" * 16, "pcrs": [10], "x": 1}, 422, "x: Extra inputs are not permitted"),
])
def test_bad_quote_requests_get_a_clear_4xx(host, body, status, message):
    with _client(host) as c:
        r = c.post("/v1/quote", json=body)
    assert r.status_code == status and r.json()["error"].startswith(message), r.text


def test_log_offsets_bodies_and_rates_are_bounded(host):
    with _client(host) as c:
        total = len(host.log.entries(0))
        r = c.get("/v1/log", params={"from": total - 1})
        assert r.status_code == 200 and r.json()["count"] == 1
        r = c.get("/v1/log", params={"from": total + 1})
        assert r.status_code == 416 and "past the end of the log" in r.json()["error"]
        assert c.get("/v1/log", params={"from": -1}).status_code == 422
        assert c.get("/v1/log", params={"from": "x"}).status_code == 422
        r = c.post("/v1/quote", content=b"{" + b" " * 300_000 + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/enrol/activate", json={"credential_blob": "AAAA", "secret": "AAAA"})
        assert r.status_code == 400 and r.json()["error"].startswith("activate: the TPM refused")
        assert c.get("/openapi.json").json()["info"]["title"] == "cwlite attestation service"
    host.state.rate_per_s, host.state.burst = 1.0, 5
    with _client(host) as c:
        codes = [c.get("/v1/health").status_code for _ in range(30)]
    assert codes.count(429) >= 20 and codes[0] == 200


def test_watch_flags_a_violation_in_the_next_round(host, store, key, reference):
    registrar.enrol(host.url, "build1", store, cas=_cas(host), interval_s=0.3)
    ref = reference.open()

    async def rounds():
        loop = asyncio.get_running_loop()
        watch = verifier.watch(store, ref, key, rounds=3)
        name, first = await anext(watch)
        assert (name, first.verdict) == ("build1", "trusted")
        started = loop.time()
        host.record(EventKind.VIOLATION, b"\x66" * 32, label="tp_build", op="exec", subject="/tmp/evil")
        _, second = await anext(watch)
        assert second.verdict == "untrusted" and second.log_start == first.log_end
        assert [e["reason"] for e in second.document["entries"]] == ["violation"]
        assert loop.time() - started >= 0.2                                  # waited (most of) one interval
        host.state.mlog = _ReplayingLog(host.log)
        host.state.mlog.first = host.log.quote(b"\0" * 32, [10])[0]          # now a replaying host
        _, third = await anext(watch)
        assert isinstance(third, VerifyError) and third.reason == "nonce"
        with pytest.raises(StopAsyncIteration):
            await anext(watch)                                              # rounds=3: done

    try:
        asyncio.run(rounds())
    finally:
        ref.db.close()
