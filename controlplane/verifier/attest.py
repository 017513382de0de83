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

import asyncio
import base64
import os
from dataclasses import asdict, dataclass
from typing import AsyncIterator, Iterable, Sequence

import httpx

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core.errors import StoreError, VerifyError
from controlplane.core.proof import digest as proof_digest
from controlplane.core.imalog import ZERO_PCR, LogEntry, boot_aggregate, replay_to
from controlplane.core.wire import API_VERSION
from controlplane.verifier.kernel_ima import KernelImaReference
from controlplane.verifier import proofs
from controlplane.verifier.client import AsyncChannel, Channel, Steps, drive, drive_async
from controlplane.verifier.client import pool as client_pool
from controlplane.verifier.evidence import BOOT_PCRS, CheckedQuote, log_steps, quote_steps
from controlplane.verifier.judge import EntryVerdict, Facts, Judge, Reference, Verdict
from controlplane.verifier.store import Host, Store

DEFAULT_INTERVAL_S = 30.0      # a host's interval until its row could be read (Host.interval_s's default)


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
    """Fetch the log from the last verified offset and replay it to the quoted PCR value, detecting a reboot."""
    return drive(ch, replay_steps(host, evidence, full=full))


def replay_steps(host: Host, evidence: CheckedQuote, *, full: bool = False) -> Steps[Replayed]:
    """`replay` as steps (client.drive / drive_async).

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
        entries = yield from log_steps(start)
    except VerifyError as exc:
        if incremental and exc.reason == "protocol":   # the log is shorter than our offset: a new boot
            rebooted, start, start_value, facts = True, 0, ZERO_PCR, Facts()
            entries = yield from log_steps(0)
        else:
            raise
    n = replay_to(entries, start_value, target, host.pcr)
    if n is None and incremental:
        # the verified prefix is gone: the host rebooted (or the log was rewritten): judge the new boot whole
        full_entries = yield from log_steps(0)
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


@dataclass
class KernelReplay:
    """The kernel IMA entries the quote covers, from where this round started."""

    start: int
    start_value: bytes
    covered: list
    pcr_value: bytes

    @property
    def end(self) -> int:
        return self.start + len(self.covered)


def kernel_ima_steps(host: Host, kref: KernelImaReference, evidence: CheckedQuote,
                     replayed: Replayed) -> Steps[KernelReplay]:
    """Fetch the kernel's own IMA log (GET /v1/ima-log) from the last verified entry and replay it to the
    quoted value of its PCR. The log is read after the quote, so it may hold more: only the prefix the
    TPM extended can reach the quoted value. VerifyError "pcr-mismatch" when none does."""
    facts = replayed.facts           # fresh after a reboot: the kernel's log restarted too
    target = evidence.quote.pcr_values.get(kref.pcr)
    if target is None:
        raise VerifyError(f"{host.name}: quote: PCR {kref.pcr} (the kernel's IMA) not quoted", reason="malformed")
    incremental = replayed.incremental and bool(facts.ima_pcr_value)
    start = facts.ima_offset if incremental else 0
    start_value = bytes.fromhex(facts.ima_pcr_value) if incremental else ZERO_PCR
    entries = yield from log_steps(start, f"/{API_VERSION}/ima-log")
    n = replay_to(entries, start_value, target, kref.pcr)
    if n is None:
        raise VerifyError(f"{host.name}: the kernel's IMA log entries {start}.. do not replay to the quoted PCR "
                          f"{kref.pcr} value {target.hex()[:16]} (an entry removed, reordered or altered)",
                          reason="pcr-mismatch")
    return KernelReplay(start, start_value, entries[:n], target)


def judge_kernel(kref: KernelImaReference, evidence: CheckedQuote, replayed: Replayed,
                 kernel: KernelReplay) -> tuple[list[EntryVerdict], list[str]]:
    """Every covered kernel IMA entry judged (verifier.kernel_ima); the facts advanced; the reasons it adds."""
    pcrs, facts = evidence.quote.pcr_values, replayed.facts
    boot = boot_aggregate(pcrs) if all(p in pcrs for p in BOOT_PCRS) else None
    verdicts = [kref.judge(e, boot) for e in kernel.covered]
    facts.ima_untrusted += sum(1 for v in verdicts if v.verdict is Verdict.UNTRUSTED)
    facts.ima_offset, facts.ima_pcr_value = kernel.end, kernel.pcr_value.hex()
    reasons = [f"{facts.ima_untrusted} kernel IMA entries not trusted (unknown file or violation)"] \
        if facts.ima_untrusted else []
    return verdicts, reasons


# one round ----------------------------------------------------------------------------
def check_policy_serial(host: Host, ref: Reference, store: Store | None) -> None:
    """Refuse to judge against a policy older than one a stored proof for this host already used.

    Whoever feeds this verifier an older (genuinely signed) policy file cannot make it vouch for a host
    running that older policy once a newer one was proven: VerifyError "policy-rollback".
    """
    seen = store.policy_serial(host.name) if store is not None else 0
    if ref.policy.serial < seen:
        src = f" {ref.policy.source}" if ref.policy.source else ""
        raise VerifyError(f"{host.name}: the verifier's policy{src} has serial {ref.policy.serial}, older than "
                          f"serial {seen} a proof for this host already used: refusing a policy rollback",
                          reason="policy-rollback")


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
    with Channel(host.url) as ch:
        return drive(ch, round_steps(host, ref, key, store=store, full=full))


async def attest_async(client: httpx.AsyncClient, host: Host, ref: Reference, key: Ed25519PrivateKey, *,
                       store: Store | None = None, full: bool = False) -> Attestation:
    """`attest`, over `client` (client.pool(): one connection pool for every host a watch attests)."""
    return await drive_async(AsyncChannel(client, host.url), round_steps(host, ref, key, store=store, full=full))


def round_steps(host: Host, ref: Reference, key: Ed25519PrivateKey, *, store: Store | None,
                full: bool) -> Steps[Attestation]:
    """One round as steps; a VerifyError is recorded in `store` as verdict "error" before it propagates."""
    try:
        return (yield from _round(host, ref, key, store=store, full=full))
    except VerifyError as exc:
        if store is not None:
            try:
                store.record(host.name, verdict="error", reason=exc.reason, message=str(exc))
            except StoreError:
                pass
        raise


def _round(host: Host, ref: Reference, key: Ed25519PrivateKey, *, store: Store | None,
           full: bool) -> Steps[Attestation]:
    """Evidence (quote, log) -> replay -> judgement -> signed proof -> store, each step in its own module."""
    check_policy_serial(host, ref, store)
    kref: KernelImaReference | None = ref.kernel_ima
    if kref is not None and kref.pcr == host.pcr:
        raise VerifyError(f"{host.name}: enrolled with cwlite's log on PCR {host.pcr}, the kernel IMA's PCR: a host "
                          "whose kernel runs IMA keeps cwlite's log elsewhere (GET /v1/health says where; enrol again)",
                          reason="malformed")
    nonce = os.urandom(32)
    evidence = yield from quote_steps(host, nonce, (kref.pcr,) if kref is not None else ())
    replayed = yield from replay_steps(host, evidence, full=full)
    kernel = (yield from kernel_ima_steps(host, kref, evidence, replayed)) if kref is not None else None
    verdict, reasons, verdicts = judge_round(host, ref, evidence, replayed, nonce)
    kernel_verdicts: list[EntryVerdict] = []
    if kref is not None and kernel is not None:
        kernel_verdicts, more = judge_kernel(kref, evidence, replayed, kernel)
        reasons.extend(more)
        verdict = Verdict.UNTRUSTED if reasons else verdict
    facts = replayed.facts
    doc = proofs.document(host, ref, nonce, evidence, log_start=replayed.start, log_end=replayed.end,
                          pcr_start=replayed.start_value, verdicts=verdicts, verdict=verdict, reasons=reasons,
                          previously_untrusted=host.facts.get("untrusted", 0) if replayed.incremental else 0,
                          listeners=facts.listeners,
                          kernel=None if kernel is None else proofs.kernel_section(
                              kref.pcr, kernel.start, kernel.end, kernel.start_value, kernel.pcr_value, kernel_verdicts))
    data, checked = proofs.sign(doc, key)
    if store is not None:
        store.record(host.name, verdict=verdict.value, reason=reasons[0] if reasons else "",
                     message="; ".join(reasons), log_start=replayed.start, log_end=replayed.end,
                     findings=doc["entries"], proof_document=data.decode(), proof_digest=proof_digest(data),
                     state={"policy_serial": ref.policy.serial, "pcr_value": evidence.pcr_value, "log_offset": replayed.end,
                            "boot_aggregate": bytes.fromhex(facts.boot_aggregate) if facts.boot_aggregate else None,
                            "daemon_starts": facts.daemon_starts, "facts": asdict(facts)})
    return Attestation(host.name, verdict, tuple(reasons), data, checked, tuple(verdicts), replayed.start,
                       replayed.end)


async def watch(store: Store, ref: Reference, key, *, hosts: Iterable[str] | None = None,
                rounds: int | None = None) -> AsyncIterator[tuple[str, Attestation | VerifyError | StoreError]]:
    """Re-attest every host at its own interval, all at once over one connection pool; yield
    (host, Attestation, VerifyError or StoreError) as each round ends.

    Each host has its own task (a slow or unreachable host delays nobody else). Runs forever unless
    `rounds` (total rounds over all hosts) is given. The caller decides what to do with an untrusted
    host (the CLI flags it on the spot and exits non-zero). A store that fails (its database
    restarting) fails that round only: nothing of it was stored, so the next round replays from the
    last verified state and judges the same entries again.
    """
    names = list(hosts) if hosts else [h.name for h in store.hosts()]
    if not names:
        raise VerifyError(f"{store.where()}: no hosts enrolled", reason="no-hosts")
    results: asyncio.Queue[tuple[str, Attestation | VerifyError | StoreError]] = asyncio.Queue()

    async def one_host(client: httpx.AsyncClient, name: str) -> None:
        interval = DEFAULT_INTERVAL_S
        while True:
            started = asyncio.get_running_loop().time()
            try:
                host = store.host(name)
                interval, started = host.interval_s, asyncio.get_running_loop().time()   # the round starts here
                result: Attestation | VerifyError | StoreError = await attest_async(client, host, ref, key,
                                                                                   store=store)
            except (VerifyError, StoreError) as exc:
                result = exc
            await results.put((name, result))
            await asyncio.sleep(max(0.0, started + interval - asyncio.get_running_loop().time()))

    async with client_pool() as client:
        tasks = [asyncio.create_task(one_host(client, name), name=f"watch-{name}") for name in names]
        try:
            done = 0
            while rounds is None or done < rounds:
                getter = asyncio.ensure_future(results.get())
                finished, _ = await asyncio.wait([getter, *tasks], return_when=asyncio.FIRST_COMPLETED)
                if getter not in finished:       # a host task died of a non-VerifyError (store, bug): surface it
                    getter.cancel()
                    for t in finished:
                        t.result()
                    continue
                done += 1
                yield getter.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


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
