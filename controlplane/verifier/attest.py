"""The verifier: is this host, right now, running only what the policy trusts? And the proof of it.

One attestation round (`attest`):
  1. a fresh nonce; POST /v1/quote over TLS; the peer's TLS key is noted;
  2. the quote is checked (AK signature, nonce bound with the TLS key) by
     controlplane.tpm.verify_quote; a quote valid for another TLS key is a relay (reason "tls-key");
  3. new measurement-log entries are fetched from the last verified offset and
     replayed from the last verified PCR value to the quoted PCR value
     (a removed, reordered or altered entry cannot reach it: "pcr-mismatch");
  4. every replayed entry is judged against the verifier's OWN policy and
     measurement DB (`Reference`), collecting a verdict per entry;
  5. a signed proof is written to the store with the new verified state, in one transaction.

Replay state carries over between rounds, so `--watch` only fetches and
judges what is new. A reboot (boot aggregate or TPM reset count change), a
second daemon start (enforcement gap), a violation or lost events make the
host untrusted from that round on.
"""
from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Iterator

from controlplane.core import imalog as mlog
from controlplane.core import proof as proof_mod
from controlplane.verifier.client import Channel
from controlplane.core.errors import CwliteError, StoreError, VerifyError
from controlplane.core.events import EventKind, alive_digest, parse_ima_name
from controlplane.core.wire import API_VERSION, MAX_LOG_PAGE, quote_qualifying_data
from controlplane.verifier.store import Host, Store

TRUSTED, UNTRUSTED, INFO = "trusted", "untrusted", "info"
ZERO = bytes(32)
BOOT_PCRS = mlog.BOOT_AGGREGATE_PCRS      # what the sha256 boot_aggregate covers


@dataclass(frozen=True)
class Reference:
    """What the verifier judges against: its own policy and measurement DB, never the host's word.

    `policy` follows controlplane.policy.Policy; `db` follows prima.measuredb.MeasureDB (open).
    `accepted_policies` are the policy digests a POLICY_LOAD entry may carry (the current one and
    any the controller pushed); the LAST one loaded must be the current policy.
    """

    policy: Any
    db: Any
    accepted_policies: frozenset[bytes] = frozenset()

    @functools.cached_property
    def policy_digest(self) -> bytes:
        return self.policy.digest()

    def accepts(self, digest: bytes) -> bool:
        return digest == self.policy_digest or digest in self.accepted_policies

    @functools.cached_property
    def db_digest(self) -> bytes:
        return self.db.digest()


@dataclass(frozen=True)
class EntryVerdict:
    """The verdict on one log entry. `reason` is a stable word; entries judged TRUSTED are not listed in proofs."""

    index: int
    verdict: str
    reason: str
    kind: str
    label: str
    op: str
    subject: str
    digest: str


@dataclass
class Facts:
    """What the already-verified prefix of a host's log established (carried between rounds)."""

    boot_aggregate: str = ""
    daemon_starts: int = 0
    daemon_running: bool = False
    policy: str = ""            # digest of the last POLICY_LOAD
    db: str = ""                # digest of the last DB_LOAD
    tls_keys: list[str] = field(default_factory=list)
    reset_count: int | None = None
    untrusted: int = 0          # untrusted entries seen so far: a host stays untrusted until it reboots


class Judge:
    """Judges entries one by one against a Reference, updating Facts. Collects, never stops at the first."""

    def __init__(self, ref: Reference, facts: Facts, *, pcr: int | None = None,
                 boot_aggregate: bytes | None = None, nonce: bytes | None = None) -> None:
        """`pcr`: the log's PCR (an entry for another PCR was not replayed: untrusted);
        `boot_aggregate`: SHA-256 over the quoted PCRs 0-9, which the log's first entry must carry;
        `nonce`: this round's nonce: a running engine must have logged its liveness entry for it."""
        self.ref = ref
        self.facts = facts
        self.pcr = pcr
        self.boot_aggregate = boot_aggregate
        self.nonce = nonce
        self.alive = False      # the engine-alive entry for `nonce` was seen
        self._trusted_sets: dict[str, frozenset[bytes]] = {}
        self._labels = ref.policy.labels

    def _trusted(self, digest: bytes, trust_set: str) -> bool:
        trusted = self._trusted_sets.get(trust_set)
        if trusted is None:
            # one query per trust set instead of one per entry (MeasureDBError if the set is unknown)
            trusted = self._trusted_sets[trust_set] = self.ref.db.trusted_digests(trust_set)
        return digest in trusted

    def judge(self, entry: Any) -> EntryVerdict:
        ev = parse_ima_name(entry.digest, entry.name)
        if ev is None:
            return self._v(entry, UNTRUSTED, "unknown-entry", "", "", "", entry.name)
        kind, f = ev.kind, self.facts
        verdict, reason = TRUSTED, ""
        if kind is EventKind.TRUSTED_LOAD:         # most entries: first, and without detours
            label = self._labels.get(ev.label)
            if label is None:
                verdict, reason = UNTRUSTED, "unknown-label"
            elif not self._trusted(ev.digest, label.trust_set):
                verdict, reason = UNTRUSTED, "not-in-db"
        elif kind is EventKind.BOOT_AGGREGATE:
            if entry.index != 0:
                verdict, reason = UNTRUSTED, "boot-aggregate-position"
            elif self.boot_aggregate is not None and ev.digest != self.boot_aggregate:
                verdict, reason = UNTRUSTED, "boot-aggregate"     # the log was not started on this boot's PCRs
            f.boot_aggregate = ev.digest.hex()
        elif kind is EventKind.DAEMON_START:
            f.daemon_starts += 1
            f.daemon_running = True
            if f.daemon_starts > 1:
                verdict, reason = UNTRUSTED, "enforcement-gap"
        elif kind is EventKind.DAEMON_STOP:
            f.daemon_running = False
            verdict, reason = UNTRUSTED, "enforcement-stopped"
        elif kind is EventKind.POLICY_LOAD:
            f.policy = ev.digest.hex()
            if not self.ref.accepts(ev.digest):
                verdict, reason = UNTRUSTED, "policy"
        elif kind is EventKind.DB_LOAD:
            f.db = ev.digest.hex()
            if ev.digest != self.ref.db_digest:
                verdict, reason = UNTRUSTED, "db"
        elif kind is EventKind.TLS_KEY:
            f.tls_keys = (f.tls_keys + [ev.digest.hex()])[-8:]
            verdict = INFO
        elif kind is EventKind.LABEL_TRANSITION:
            label = self._labels.get(ev.label)
            if label is None:
                verdict, reason = UNTRUSTED, "unknown-label"
            elif label.entrypoints and ev.subject not in label.entrypoints:
                verdict, reason = UNTRUSTED, "entrypoint"
        elif kind is EventKind.VIOLATION:
            verdict, reason = UNTRUSTED, "violation"
        elif kind is EventKind.LOST_EVENTS:
            verdict, reason = UNTRUSTED, "lost-events"
        elif kind is EventKind.ENGINE_ALIVE:
            verdict = INFO
            if self.nonce is not None and ev.digest == alive_digest(self.nonce):
                self.alive = True
        if self.pcr is not None and entry.pcr != self.pcr:
            verdict, reason = UNTRUSTED, "wrong-pcr"
        if verdict == UNTRUSTED:
            f.untrusted += 1
        return self._v(entry, verdict, reason, kind.value, ev.label, ev.op, ev.subject)

    @staticmethod
    def _v(entry: Any, verdict: str, reason: str, kind: str, label: str, op: str, subject: str) -> EntryVerdict:
        return EntryVerdict(entry.index, verdict, reason, kind, label, op, subject, entry.digest.hex())

    def overall(self, peer_spki: bytes | None) -> list[str]:
        """Whole-log conditions, as reasons (empty = none failed)."""
        f, reasons = self.facts, []
        if f.untrusted:
            reasons.append(f"{f.untrusted} untrusted entries")
        if not f.boot_aggregate:
            reasons.append("no boot_aggregate entry")
        if not f.daemon_running:
            reasons.append("enforcement not running (no daemon-start, or stopped)")
        elif self.nonce is not None and not self.alive:
            reasons.append("enforcement engine silent: no engine-alive entry for this round's nonce "
                           "(the engine is dead or stalled behind a live attestation service)")
        if f.policy != self.ref.policy_digest.hex():
            reasons.append(f"active policy {f.policy[:16] or 'none'} is not the verifier's {self.ref.policy_digest.hex()[:16]}")
        if f.db and f.db != self.ref.db_digest.hex():
            reasons.append(f"measurement DB {f.db[:16]} is not the verifier's")
        if peer_spki is not None and peer_spki.hex() not in f.tls_keys:
            reasons.append("the TLS key of this channel was never logged")
        return reasons


# replay ---------------------------------------------------------------------------
def replay_to(entries: list, start_value: bytes, target: bytes, pcr: int) -> int | None:
    """How many of `entries` extend `start_value` to `target` (0 if already equal), or None.

    `start_value` is the PCR after the entries already verified (zero for a whole log): the
    incremental form of controlplane.mlog.replay_prefixes. The quote covers exactly `log_length`
    entries, but a verifier does not take the host's word for it: the only prefix that can reach
    the quoted value is the one the TPM extended (a hash chain cannot match twice).
    """
    if start_value == target:
        return 0
    value, sha = start_value, hashlib.sha256
    for n, e in enumerate(entries, 1):
        if e.pcr == pcr:
            value = sha(value + e.pcr_digest).digest()
            if value == target:
                return n
    return None


def _parse_page(text: str, start: int, source: str = "log") -> list:
    """Entries of one /v1/log page, with their absolute indices (mlog's parser: one format, one parser)."""
    from controlplane.core.errors import LogError

    try:
        entries = mlog.parse_ascii(text, source=source)
    except LogError as exc:
        raise VerifyError(f"{exc} (entry {start + (exc.entry or 0)} of the host's log)", reason="log") from exc
    if start and entries and entries[0].index != start:
        entries = [replace(e, index=start + i) for i, e in enumerate(entries)]
    return entries


def fetch_log(ch: Channel, start: int) -> list:
    """All entries from `start`, page by page."""
    out: list = []
    while True:
        page = ch.get(f"/{API_VERSION}/log", **{"from": start + len(out), "limit": MAX_LOG_PAGE})
        out.extend(_parse_page(page["ascii"], page["start"], f"{ch.url}/{API_VERSION}/log"))
        if page["count"] == 0 or page["start"] + page["count"] >= page["total"]:
            return out


# one round ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Attestation:
    """The outcome of one round: the proof's bytes and document, and the per-entry verdicts."""

    host: str
    verdict: str
    reasons: tuple[str, ...]
    proof: bytes
    document: dict
    entries: tuple[EntryVerdict, ...]
    log_start: int
    log_end: int


def _quote_checked(ch: Channel, host: Host, nonce: bytes):
    from controlplane.core import quote as tpm_mod

    # PCRs 0-9 too: the log's boot_aggregate entry must match them (the log belongs to this boot)
    pcrs = sorted({*BOOT_PCRS, host.pcr})
    resp = ch.post(f"/{API_VERSION}/quote", {"nonce": nonce.hex(), "pcrs": pcrs})
    peer = ch.peer_spki_sha256
    try:
        quote = tpm_mod.Quote.from_dict(resp["quote"])
    except (KeyError, TypeError, ValueError, CwliteError) as exc:
        raise VerifyError(f"{host.name}: quote: malformed ({exc})", reason="malformed") from exc
    try:
        info = tpm_mod.verify_quote(host.ak_public, quote, quote_qualifying_data(nonce, peer))
    except VerifyError as exc:
        if exc.reason != "nonce":
            raise
        claimed = bytes.fromhex(str(resp.get("tls_spki_sha256", "")).strip() or "00")
        if claimed != peer:
            try:
                tpm_mod.verify_quote(host.ak_public, quote, quote_qualifying_data(nonce, claimed))
            except VerifyError:
                raise exc from None
            raise VerifyError(f"{host.name}: the quote binds TLS key {claimed.hex()[:16]} but this channel's key "
                              f"is {peer.hex()[:16]}: a relay (man in the middle)", reason="tls-key") from None
        raise
    value = quote.pcr_values.get(host.pcr)
    if value is None:
        raise VerifyError(f"{host.name}: quote: PCR {host.pcr} not quoted", reason="malformed")
    return quote, info, peer, value


def attest(host: Host, ref: Reference, key, *, store: Store | None = None, full: bool = False) -> Attestation:
    """One attestation round against `host` (see the module docstring). VerifyError when it cannot conclude.

    A VerifyError (bad signature, replayed nonce, relay, PCR mismatch) is recorded in `store` as
    verdict "error" with its reason before it propagates.
    """
    try:
        return _attest(host, ref, key, store=store, full=full)
    except VerifyError as exc:
        if store is not None:
            try:
                store.record(host.name, verdict="error", reason=exc.reason, message=str(exc))
            except StoreError:
                pass
        raise


def _facts_of(host: Host) -> Facts:
    known = set(Facts.__dataclass_fields__)
    return Facts(**{k: v for k, v in (host.facts or {}).items() if k in known})


def _attest(host: Host, ref: Reference, key, *, store: Store | None, full: bool) -> Attestation:
    nonce = os.urandom(32)
    with Channel(host.url) as ch:
        quote, info, peer, target = _quote_checked(ch, host, nonce)
        reset = getattr(info, "reset_count", None)
        incremental = not full and host.pcr_value is not None and host.log_offset > 0
        facts = _facts_of(host) if incremental else Facts()
        rebooted = incremental and facts.reset_count is not None and reset is not None and reset != facts.reset_count
        if rebooted:
            incremental, facts = False, Facts()
        start = host.log_offset if incremental else 0
        start_value = host.pcr_value if incremental else ZERO
        try:
            entries = fetch_log(ch, start)
        except VerifyError as exc:
            if incremental and exc.reason == "protocol":   # the log is shorter than our offset: a new boot
                rebooted, start, start_value, facts = True, 0, ZERO, Facts()
                entries = fetch_log(ch, 0)
            else:
                raise
        n = replay_to(entries, start_value, target, host.pcr)
        if n is None and incremental:
            # the verified prefix is gone: the host rebooted (or the log was rewritten): judge the new boot whole
            full_entries = fetch_log(ch, 0)
            n = replay_to(full_entries, ZERO, target, host.pcr)
            if n is not None:
                rebooted, start, start_value, facts, entries = True, 0, ZERO, Facts(), full_entries
        if n is None:
            raise VerifyError(f"{host.name}: log entries {start}.. do not replay to the quoted PCR {host.pcr} "
                              f"value {target.hex()[:16]} (an entry removed, reordered or altered)",
                              reason="pcr-mismatch")
        covered = entries[:n]
    if facts.reset_count is None:
        facts.reset_count = reset
    old_boot = host.boot_aggregate.hex() if host.boot_aggregate else ""
    boot = None
    if all(p in quote.pcr_values for p in BOOT_PCRS):
        boot = mlog.boot_aggregate(quote.pcr_values)
    judge = Judge(ref, facts, pcr=host.pcr, boot_aggregate=boot, nonce=nonce)
    verdicts = [judge.judge(e) for e in covered]
    reasons = judge.overall(peer)
    if old_boot and facts.boot_aggregate and facts.boot_aggregate != old_boot:
        rebooted = True
    if rebooted:
        reasons.insert(0, "reboot: the host restarted since the last verified state")
    verdict = TRUSTED if not reasons else UNTRUSTED
    listed = [asdict(v) for v in verdicts if v.verdict != TRUSTED and v.verdict != INFO]
    log_end = start + n
    document = {
        "host": {"name": host.name, "url": host.url,
                 "ek_sha256": hashlib.sha256(host.ek_public).hexdigest(),
                 "ak_sha256": hashlib.sha256(host.ak_public).hexdigest(),
                 "ak_public": base64.b64encode(host.ak_public).decode(),
                 "tls_spki_sha256": peer.hex()},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nonce": nonce.hex(),
        "quote": quote.to_dict(),
        "quote_info": _info_dict(info),
        "log": {"pcr": host.pcr, "start": start, "end": log_end, "pcr_start": start_value.hex(),
                "pcr_value": target.hex()},
        "policy_digest": ref.policy_digest.hex(), "db_digest": ref.db_digest.hex(),
        "entries": listed, "trusted_entries": sum(1 for v in verdicts if v.verdict in (TRUSTED, INFO)),
        "previously_untrusted": host.facts.get("untrusted", 0) if incremental else 0,
        "verdict": verdict, "reasons": reasons,
    }
    data = proof_mod.sign(document, key)
    doc = proof_mod.check(data, key.public_key())
    if store is not None:
        store.record(host.name, verdict=verdict, reason=reasons[0] if reasons else "", message="; ".join(reasons),
                     log_start=start, log_end=log_end, findings=listed, proof_document=data.decode(),
                     proof_digest=proof_mod.digest(data),
                     state={"pcr_value": target, "log_offset": log_end,
                            "boot_aggregate": bytes.fromhex(facts.boot_aggregate) if facts.boot_aggregate else None,
                            "daemon_starts": facts.daemon_starts, "facts": asdict(facts)})
    return Attestation(host.name, verdict, tuple(reasons), data, doc, tuple(verdicts), start, log_end)


def _info_dict(info: Any) -> dict:
    out = {}
    for name in ("pcr_select", "pcrs", "pcr_digest", "clock", "reset_count", "restart_count", "safe",
                 "firmware_version"):
        v = getattr(info, name, None)
        if v is None:
            continue
        if isinstance(v, bytes):
            v = v.hex()
        elif isinstance(v, (tuple, list)):
            v = list(v)
        elif not isinstance(v, (int, str, bool, float)):
            v = str(v)
        out[name] = v
    return out


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
