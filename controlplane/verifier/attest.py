"""The verifier: is this host, right now, running only what the policy trusts? And the proof of it.

One attestation round (`attest`):
  1. a fresh nonce; POST /v1/quote over TLS; the peer's TLS key is noted;
  2. the quote is checked (AK signature, nonce bound with the TLS key) by
     verifier.evidence; a quote valid for another TLS key is a relay (reason "tls-key");
  3. new measurement-log entries are fetched from the last verified offset and
     replayed from the last verified PCR value to the quoted PCR value
     (a removed, reordered or altered entry cannot reach it: "pcr-mismatch");
  4. every replayed entry is judged against the verifier's OWN policy and
     measurement DB (verifier.judge), collecting a verdict per entry;
  5. a signed proof (verifier.proofs) is written to the store with the new verified state, in one transaction.

Replay state carries over between rounds, so `--watch` only fetches and
judges what is new. A reboot (boot aggregate or TPM reset count change), a
second daemon start (enforcement gap), a violation or lost events make the
host untrusted from that round on.
"""
from __future__ import annotations

import base64
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core.errors import StoreError, VerifyError
from controlplane.core.proof import digest as proof_digest
from controlplane.core.imalog import ZERO_PCR, LogEntry, boot_aggregate, replay_to
from controlplane.core.wire import API_VERSION
from controlplane.verifier import proofs
from controlplane.verifier.client import Channel
from controlplane.verifier.evidence import BOOT_PCRS, CheckedQuote, fetch_log, fetch_quote
from controlplane.verifier.judge import EntryVerdict, Facts, Judge, Reference, Verdict
from controlplane.verifier.store import Host, Store


# replay ----------------------------------------------------------------------------
@dataclass
class Replayed:
    """The entries the quote covers, from where this round started, and what the earlier rounds established.

    `rebooted`: the verified prefix is gone (TPM reset count changed, log shorter or rewritten), so
    the new boot was judged whole and `facts` start afresh.
    """

    start: int
    start_value: bytes
    covered: Sequence[LogEntry]
    facts: Facts
    incremental: bool
    rebooted: bool = False

    @property
    def end(self) -> int:
        return self.start + len(self.covered)


def facts_of(host: Host) -> Facts:
    """The facts the host's last verified round established (unknown keys of older stores ignored)."""
    known = set(Facts.__dataclass_fields__)
    return Facts(**{k: v for k, v in (host.facts or {}).items() if k in known})


def replay(ch: Channel, host: Host, evidence: CheckedQuote, *, full: bool = False) -> Replayed:
    """Fetch the log from the last verified offset and replay it to the quoted PCR value, detecting a reboot.

    VerifyError "pcr-mismatch" when no prefix reaches the quoted value (an entry removed, reordered or altered).
    """
    target, reset = evidence.pcr_value, getattr(evidence.info, "reset_count", None)
    incremental = not full and host.pcr_value is not None and host.log_offset > 0
    facts = facts_of(host) if incremental else Facts()
    rebooted = incremental and facts.reset_count is not None and reset is not None and reset != facts.reset_count
    if rebooted:
        incremental, facts = False, Facts()
    start = host.log_offset if incremental else 0
    start_value = host.pcr_value if incremental else ZERO_PCR
    try:
        entries = fetch_log(ch, start)
    except VerifyError as exc:
        if incremental and exc.reason == "protocol":   # the log is shorter than our offset: a new boot
            rebooted, start, start_value, facts = True, 0, ZERO_PCR, Facts()
            entries = fetch_log(ch, 0)
        else:
            raise
    n = replay_to(entries, start_value, target, host.pcr)
    if n is None and incremental:
        # the verified prefix is gone: the host rebooted (or the log was rewritten): judge the new boot whole
        full_entries = fetch_log(ch, 0)
        n = replay_to(full_entries, ZERO_PCR, target, host.pcr)
        if n is not None:
            rebooted, start, start_value, facts, entries = True, 0, ZERO_PCR, Facts(), full_entries
    if n is None:
        raise VerifyError(f"{host.name}: log entries {start}.. do not replay to the quoted PCR {host.pcr} "
                          f"value {target.hex()[:16]} (an entry removed, reordered or altered)",
                          reason="pcr-mismatch")
    if facts.reset_count is None:
        facts.reset_count = reset
    return Replayed(start, start_value, entries[:n], facts, incremental, rebooted)


# one round ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Attestation:
    """The outcome of one round: the proof's bytes and document, and the per-entry verdicts."""

    host: str
    verdict: Verdict
    reasons: tuple[str, ...]
    proof: bytes
    document: dict
    entries: tuple[EntryVerdict, ...]
    log_start: int
    log_end: int


def judge_round(host: Host, ref: Reference, evidence: CheckedQuote, replayed: Replayed, nonce: bytes
                ) -> tuple[Verdict, list[str], list[EntryVerdict]]:
    """Every covered entry judged, then the whole-log conditions: the round's verdict, reasons and entry
    verdicts. `nonce` is the round's: a running engine must have logged its liveness entry for it."""
    facts, rebooted = replayed.facts, replayed.rebooted
    pcrs = evidence.quote.pcr_values
    boot = boot_aggregate(pcrs) if all(p in pcrs for p in BOOT_PCRS) else None
    judge = Judge(ref, facts, pcr=host.pcr, boot_aggregate=boot, nonce=nonce)
    verdicts = [judge.judge(e) for e in replayed.covered]
    reasons = judge.overall(evidence.peer_spki)
    old_boot = host.boot_aggregate.hex() if host.boot_aggregate else ""
    if old_boot and facts.boot_aggregate and facts.boot_aggregate != old_boot:
        rebooted = True
    if rebooted:
        reasons.insert(0, "reboot: the host restarted since the last verified state")
    return (Verdict.UNTRUSTED if reasons else Verdict.TRUSTED), reasons, verdicts


def attest(host: Host, ref: Reference, key: Ed25519PrivateKey, *, store: Store | None = None,
           full: bool = False) -> Attestation:
    """One attestation round against `host` (see the module docstring). VerifyError when it cannot conclude.

    A VerifyError (bad signature, replayed nonce, relay, PCR mismatch) is recorded in `store` as
    verdict "error" with its reason before it propagates.
    """
    try:
        return _round(host, ref, key, store=store, full=full)
    except VerifyError as exc:
        if store is not None:
            try:
                store.record(host.name, verdict="error", reason=exc.reason, message=str(exc))
            except StoreError:
                pass
        raise


def _round(host: Host, ref: Reference, key: Ed25519PrivateKey, *, store: Store | None, full: bool) -> Attestation:
    """Evidence (quote, log) -> replay -> judgement -> signed proof -> store, each step in its own module."""
    nonce = os.urandom(32)
    with Channel(host.url) as ch:
        evidence = fetch_quote(ch, host, nonce)
        replayed = replay(ch, host, evidence, full=full)
    verdict, reasons, verdicts = judge_round(host, ref, evidence, replayed, nonce)
    facts = replayed.facts
    doc = proofs.document(host, ref, nonce, evidence, log_start=replayed.start, log_end=replayed.end,
                          pcr_start=replayed.start_value, verdicts=verdicts, verdict=verdict, reasons=reasons,
                          previously_untrusted=host.facts.get("untrusted", 0) if replayed.incremental else 0)
    data, checked = proofs.sign(doc, key)
    if store is not None:
        store.record(host.name, verdict=verdict.value, reason=reasons[0] if reasons else "",
                     message="; ".join(reasons), log_start=replayed.start, log_end=replayed.end,
                     findings=doc["entries"], proof_document=data.decode(), proof_digest=proof_digest(data),
                     state={"pcr_value": evidence.pcr_value, "log_offset": replayed.end,
                            "boot_aggregate": bytes.fromhex(facts.boot_aggregate) if facts.boot_aggregate else None,
                            "daemon_starts": facts.daemon_starts, "facts": asdict(facts)})
    return Attestation(host.name, verdict, tuple(reasons), data, checked, tuple(verdicts), replayed.start,
                       replayed.end)


def watch(store: Store, ref: Reference, key, *, hosts: Iterable[str] | None = None,
          rounds: int | None = None, sleep=time.sleep, now=time.monotonic) -> Iterator[tuple[str, Attestation | VerifyError]]:
    """Re-attest each host at its own interval; yield (host, Attestation or VerifyError) as each round ends.

    Runs forever unless `rounds` (total rounds over all hosts) is given. The caller decides what to
    do with an untrusted host (the CLI flags it on the spot).
    """
    names = list(hosts) if hosts else [h.name for h in store.hosts()]
    if not names:
        raise VerifyError(f"{store.where()}: no hosts enrolled", reason="no-hosts")
    due = {name: now() for name in names}
    done = 0
    while rounds is None or done < rounds:
        name = min(due, key=due.get)
        wait = due[name] - now()
        if wait > 0:
            sleep(wait)
        host = store.host(name)
        try:
            result: Attestation | VerifyError = attest(host, ref, key, store=store)
        except VerifyError as exc:
            result = exc
        due[name] = now() + host.interval_s
        done += 1
        yield name, result


def push_policy(host: Host, policy_text: str, signature: bytes) -> dict:
    """Push a controller-signed policy to `host` over its attestation channel; returns the host's answer.

    The host loads it only if the signature checks, and logs a POLICY_LOAD entry; the next
    attestation round then judges that entry (the verifier's Reference must accept the new digest).
    """
    with Channel(host.url) as ch:
        ch.get(f"/{API_VERSION}/health")
        verified = (host.facts or {}).get("tls_keys", [])[-1:]
        if ch.peer_spki_sha256 is None or ch.peer_spki_sha256.hex() not in verified:
            raise VerifyError(f"{host.name}: the TLS key at {host.url} is not the one last attested: "
                              "attest before pushing a policy", reason="tls-key")
        return ch.post(f"/{API_VERSION}/policy", {"policy": policy_text,
                                                  "signature": base64.b64encode(signature).decode()})
