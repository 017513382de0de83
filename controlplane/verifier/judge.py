"""The verifier's judgement: each measurement-log entry against the verifier's own policy and DB.

`Judge` goes entry by entry, collecting a verdict per entry (it never stops at
the first bad one) and the `Facts` the log establishes (boot aggregate, daemon
starts, the policy and DB loaded, TLS keys); `overall` turns those facts into
whole-log reasons. Pure: no transport, no TPM, no storage.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from controlplane.core.events import Event, EventKind, alive_digest, parse_ima_name, transition_source
from controlplane.core.policy import expires_text


class Verdict(StrEnum):
    """An entry's (and a round's) verdict; INFO entries (TLS keys) neither help nor hurt."""

    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"
    INFO = "info"


@dataclass(frozen=True)
class Reference:
    """What the verifier judges against: its own policy and measurement DB, never the host's word.

    `policy` follows controlplane.core.policy.Policy; `db` follows prima.measuredb.MeasureDB (open).
    `accepted_policies` are the policy digests a POLICY_LOAD entry may carry (the current one and
    any the controller pushed); the LAST one loaded must be the current policy.
    """

    policy: Any
    db: Any
    accepted_policies: frozenset[bytes] = frozenset()
    kernel_ima: Any = None      # verifier.kernel_ima.KernelImaReference: also attest the kernel's own IMA log

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
    verdict: Verdict
    reason: str
    kind: str
    label: str
    op: str
    subject: str
    digest: str

    def as_dict(self) -> dict[str, Any]:
        """The entry as a proof lists it (plain JSON values)."""
        return {**asdict(self), "verdict": self.verdict.value}


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
    ima_offset: int = 0         # the kernel's IMA log: entries verified so far,
    ima_pcr_value: str = ""     # its PCR's value after them (hex),
    ima_untrusted: int = 0      # and its unknown or violation entries (sticky until a reboot, as `untrusted`)


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
            return self._v(entry, Verdict.UNTRUSTED, "unknown-entry", "", "", "", entry.name)
        kind, f = ev.kind, self.facts
        verdict, reason = Verdict.TRUSTED, ""
        if kind is EventKind.TRUSTED_LOAD:         # most entries: first, and without detours
            label = self._labels.get(ev.label)
            if label is None:
                verdict, reason = Verdict.UNTRUSTED, "unknown-label"
            elif not self._trusted(ev.digest, label.trust_set):
                verdict, reason = Verdict.UNTRUSTED, "not-in-db"
        elif kind is EventKind.BOOT_AGGREGATE:
            if entry.index != 0:
                verdict, reason = Verdict.UNTRUSTED, "boot-aggregate-position"
            elif self.boot_aggregate is not None and ev.digest != self.boot_aggregate:
                verdict, reason = Verdict.UNTRUSTED, "boot-aggregate"     # the log was not started on this boot's PCRs
            f.boot_aggregate = ev.digest.hex()
        elif kind is EventKind.DAEMON_START:
            f.daemon_starts += 1
            f.daemon_running = True
            if f.daemon_starts > 1:
                verdict, reason = Verdict.UNTRUSTED, "enforcement-gap"
        elif kind is EventKind.DAEMON_STOP:
            f.daemon_running = False
            verdict, reason = Verdict.UNTRUSTED, "enforcement-stopped"
        elif kind is EventKind.POLICY_LOAD:
            f.policy = ev.digest.hex()
            if not self.ref.accepts(ev.digest):
                verdict, reason = Verdict.UNTRUSTED, "policy"
        elif kind is EventKind.DB_LOAD:
            f.db = ev.digest.hex()
            if ev.digest != self.ref.db_digest:
                verdict, reason = Verdict.UNTRUSTED, "db"
        elif kind is EventKind.TLS_KEY:
            f.tls_keys = (f.tls_keys + [ev.digest.hex()])[-8:]
            verdict = Verdict.INFO
        elif kind is EventKind.LABEL_TRANSITION:
            verdict, reason = self._transition(ev)
        elif kind is EventKind.VIOLATION:
            verdict, reason = Verdict.UNTRUSTED, "violation"
        elif kind is EventKind.LOST_EVENTS:
            verdict, reason = Verdict.UNTRUSTED, "lost-events"
        elif kind is EventKind.ENGINE_ALIVE:
            verdict = Verdict.INFO
            if self.nonce is not None and ev.digest == alive_digest(self.nonce):
                self.alive = True
        if self.pcr is not None and entry.pcr != self.pcr:
            verdict, reason = Verdict.UNTRUSTED, "wrong-pcr"
        if verdict is Verdict.UNTRUSTED:
            f.untrusted += 1
        return self._v(entry, verdict, reason, kind.value, ev.label, ev.op, ev.subject)

    def _transition(self, ev: Event) -> tuple[Verdict, str]:
        """A label-transition entry: into a known label through its entrypoint, from no label or
        along a transition the label left declares; or a drop, which only an on_exec="drop" label makes."""
        label = self._labels.get(ev.label)
        if label is None:
            return Verdict.UNTRUSTED, "unknown-label"
        if ev.op == "drop":
            return (Verdict.TRUSTED, "") if label.on_exec == "drop" else (Verdict.UNTRUSTED, "drop")
        source = transition_source(ev.op)
        if source and ev.label not in getattr(self._labels.get(source), "transitions", ()):
            return Verdict.UNTRUSTED, "undeclared-transition"
        if not source and ev.op != "exec":
            return Verdict.UNTRUSTED, "unknown-entry"
        if label.entrypoints and ev.subject not in label.entrypoints:
            return Verdict.UNTRUSTED, "entrypoint"
        return Verdict.TRUSTED, ""

    @staticmethod
    def _v(entry: Any, verdict: Verdict, reason: str, kind: str, label: str, op: str, subject: str) -> EntryVerdict:
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
        if self.ref.policy.expired():
            reasons.append(f"the verifier's policy expired at {expires_text(self.ref.policy.expires)}")
        if f.policy != self.ref.policy_digest.hex():
            reasons.append(f"active policy {f.policy[:16] or 'none'} is not the verifier's {self.ref.policy_digest.hex()[:16]}")
        if f.db and f.db != self.ref.db_digest.hex():
            reasons.append(f"measurement DB {f.db[:16]} is not the verifier's")
        if peer_spki is not None and peer_spki.hex() not in f.tls_keys:
            reasons.append("the TLS key of this channel was never logged")
        return reasons
