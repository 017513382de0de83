"""The verifier's judgement: each measurement-log entry against the verifier's own policy and DB.

`Judge` goes entry by entry, collecting a verdict per entry (it never stops at
the first bad one) and the `Facts` the log establishes (boot aggregate, daemon
starts, the policy and DB loaded, TLS keys); `overall` turns those facts into
whole-log reasons. Pure: no transport, no TPM, no storage.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from controlplane.core.errors import CwliteError
from controlplane.core.events import Event, EventKind, alive_digest, ima_name_fields, parse_pa_subject, transition_source
from controlplane.core.policy import expires_text
from controlplane.core.selinux_render import render

# Port Authority ops a TP makes itself (refused: the TP tried to step outside its rules) vs what
# the network sends it (refused: the filter did its job; anyone outside can make these).
PA_TP_OPS = frozenset({"bind", "listen", "accept", "connect", "send", "socket", "hold"})

# Kinds whose verdict depends only on the entry's (name, digest) and the Reference: judged once per
# distinct pair (a log repeats them), the rest (facts, order, nonce) entry by entry.
_STATELESS = frozenset({EventKind.TRUSTED_LOAD, EventKind.LABEL_TRANSITION, EventKind.VIOLATION,
                        EventKind.LOST_EVENTS})
_new = tuple.__new__


class Verdict(StrEnum):
    """An entry's (and a round's) verdict; INFO entries (TLS keys) neither help nor hurt."""

    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"
    INFO = "info"


_VERDICTS = {v.value: v for v in Verdict}


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

    @functools.cached_property
    def selinux_module_digest(self) -> bytes | None:
        """The SELinux module rendered from the verifier's policy (None when the policy renders none):
        a loaded module must be byte for byte this one, so a hand-edited module is caught."""
        try:
            return bytes.fromhex(render(self.policy).digest())
        except CwliteError:
            return None


class EntryVerdict(NamedTuple):
    """The verdict on one log entry. `reason` is a stable word; entries judged TRUSTED are not listed in proofs.
    A tuple: a 100,000-entry round makes 100,000 of them."""

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
        return {**self._asdict(), "verdict": self.verdict.value}


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
    listeners: list[str] = field(default_factory=list)  # Port Authority listeners: "label proto/port sha256"


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
        self._rows: dict[tuple[str, bytes], tuple] = {}    # (name, digest) -> verdict row, stateless kinds
        self._labels = ref.policy.labels

    def _trusted(self, digest: bytes, trust_set: str) -> bool:
        trusted = self._trusted_sets.get(trust_set)
        if trusted is None:
            # one query per trust set instead of one per entry (MeasureDBError if the set is unknown)
            trusted = self._trusted_sets[trust_set] = self.ref.db.trusted_digests(trust_set)
        return digest in trusted

    def judge(self, entry: Any) -> EntryVerdict:
        row = self._rows.get((entry.name, entry.digest))
        if row is None:
            row = self._judge(entry)
        verdict, reason = _VERDICTS[row[0]], row[1]
        if self.pcr is not None and entry.pcr != self.pcr:
            verdict, reason = Verdict.UNTRUSTED, "wrong-pcr"
        if verdict is Verdict.UNTRUSTED:
            self.facts.untrusted += 1
        return _new(EntryVerdict, (entry.index, verdict, reason, row[2], row[3], row[4], row[5], row[6]))

    def _judge(self, entry: Any) -> tuple:
        """(verdict, reason, kind, label, op, subject, digest) of an entry, the PCR aside, all str (a tuple of
        str is one the garbage collector stops tracking); kept for reuse when its kind is stateless."""
        parsed = ima_name_fields(entry.name)
        if parsed is None:
            row = self._rows[entry.name, entry.digest] = ("untrusted", "unknown-entry", "", "", "", entry.name,
                                                         entry.digest.hex())
            return row
        kind, label_name, op, subject = parsed
        digest, f = entry.digest, self.facts
        verdict, reason = Verdict.TRUSTED, ""
        if kind is EventKind.TRUSTED_LOAD:         # most entries: first, and without detours
            label = self._labels.get(label_name)
            if label is None:
                verdict, reason = Verdict.UNTRUSTED, "unknown-label"
            elif not self._trusted(digest, label.trust_set):
                verdict, reason = Verdict.UNTRUSTED, "not-in-db"
        elif kind is EventKind.BOOT_AGGREGATE:
            if entry.index != 0:
                verdict, reason = Verdict.UNTRUSTED, "boot-aggregate-position"
            elif self.boot_aggregate is not None and digest != self.boot_aggregate:
                verdict, reason = Verdict.UNTRUSTED, "boot-aggregate"     # the log was not started on this boot's PCRs
            f.boot_aggregate = digest.hex()
        elif kind is EventKind.DAEMON_START:
            f.daemon_starts += 1
            f.daemon_running = True
            if f.daemon_starts > 1:
                verdict, reason = Verdict.UNTRUSTED, "enforcement-gap"
        elif kind is EventKind.DAEMON_STOP:
            f.daemon_running = False
            verdict, reason = Verdict.UNTRUSTED, "enforcement-stopped"
        elif kind is EventKind.POLICY_LOAD:
            f.policy = digest.hex()
            if not self.ref.accepts(digest):
                verdict, reason = Verdict.UNTRUSTED, "policy"
        elif kind is EventKind.DB_LOAD:
            f.db = digest.hex()
            if digest != self.ref.db_digest:
                verdict, reason = Verdict.UNTRUSTED, "db"
        elif kind is EventKind.TLS_KEY:
            f.tls_keys = (f.tls_keys + [digest.hex()])[-8:]
            verdict = Verdict.INFO
        elif kind is EventKind.LABEL_TRANSITION:
            verdict, reason = self._transition(label_name, op, subject)
        elif kind is EventKind.VIOLATION:
            verdict, reason = Verdict.UNTRUSTED, "violation"
        elif kind is EventKind.LOST_EVENTS:
            verdict, reason = Verdict.UNTRUSTED, "lost-events"
        elif kind in (EventKind.VM_PART, EventKind.VM_VTPM):
            verdict = Verdict.INFO      # the host vouching for a VM: judged by verifier.chain for that VM
        elif kind is EventKind.PA_LISTENER:
            verdict, reason = self._listener(Event(kind, digest, label_name, op, subject))
        elif kind is EventKind.PA_REFUSED:
            verdict, reason = self._refused(Event(kind, digest, label_name, op, subject))
        elif kind is EventKind.SELINUX_LOAD:
            if digest != self.ref.selinux_module_digest:
                verdict, reason = Verdict.UNTRUSTED, "selinux-module"
        elif kind is EventKind.ENGINE_ALIVE:
            verdict = Verdict.INFO
            if self.nonce is not None and digest == alive_digest(self.nonce):
                self.alive = True
        row = (verdict.value, reason, kind.value, label_name, op, subject, digest.hex())
        if kind in _STATELESS:
            self._rows[entry.name, entry.digest] = row
        return row

    def _transition(self, label_name: str, op: str, subject: str) -> tuple[Verdict, str]:
        """A label-transition entry: into a known label through its entrypoint, from no label or
        along a transition the label left declares; or a drop, which only an on_exec="drop" label makes."""
        label = self._labels.get(label_name)
        if label is None:
            return Verdict.UNTRUSTED, "unknown-label"
        if op == "drop":
            return (Verdict.TRUSTED, "") if label.on_exec == "drop" else (Verdict.UNTRUSTED, "drop")
        source = transition_source(op)
        if source and label_name not in getattr(self._labels.get(source), "transitions", ()):
            return Verdict.UNTRUSTED, "undeclared-transition"
        if not source and op != "exec":
            return Verdict.UNTRUSTED, "unknown-entry"
        if label.entrypoints and subject not in label.entrypoints:
            return Verdict.UNTRUSTED, "entrypoint"
        return Verdict.TRUSTED, ""

    def _opens(self, label: str, protocol: str, port: int) -> bool:
        """Does a listen rule of the verifier's policy let `label` take `protocol`/`port`?"""
        return any(r.op == "listen" and r.protocol == protocol and r.port == port and label in r.labels
                   for r in self.ref.policy.port_authority.rules)

    def _listener(self, ev: Event) -> tuple[Verdict, str]:
        """A TP took a port: a listen rule of the verifier's policy must allow it, and the program that
        took it must be trusted for the label (its digest is that program's measurement)."""
        s = parse_pa_subject(ev.subject)
        label = self._labels.get(ev.label)
        if s is None:
            return Verdict.UNTRUSTED, "unknown-entry"
        self.facts.listeners = (self.facts.listeners + [f"{ev.label} {s.protocol}/{s.port} {ev.digest.hex()}"])[-64:]
        if label is None:
            return Verdict.UNTRUSTED, "unknown-label"
        if not self._opens(ev.label, s.protocol, s.port):
            return Verdict.UNTRUSTED, "pa-listener-outside-rules"
        if not self._trusted(ev.digest, label.trust_set):
            return Verdict.UNTRUSTED, "not-in-db"
        return Verdict.TRUSTED, ""

    def _refused(self, ev: Event) -> tuple[Verdict, str]:
        """Counts of what Port Authority refused (or, in audit mode, let through) in one interval.
        Let through: a TP listened or received outside its rules. Refused: what a TP tried itself is a
        violation, as PRIMA's denied execs are; what the network sent is what the filter is for (INFO)."""
        s = parse_pa_subject(ev.subject)
        if s is None:
            return Verdict.UNTRUSTED, "unknown-entry"
        if s.action not in ("denied", "killed"):
            return Verdict.UNTRUSTED, f"pa-{ev.op}-outside-rules"
        if ev.label and ev.op in PA_TP_OPS:
            return Verdict.UNTRUSTED, f"pa-{ev.op}-refused"
        return Verdict.INFO, ""

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
