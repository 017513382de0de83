"""Integrity-relevant events: what enforcement engines produce and the measurement log records.

One event becomes one measurement-log entry (ima-ng template): `digest` is its
`d-ng` field and `ima_name()` its `n-ng` field. The name encodes the kind, the
TP label, the operation and the subject so the verifier can judge the entry
from the log alone:

    cwlite:<kind>:<label or ->:<op or ->:<subject>

`subject` is last so it may hold any text, colons and spaces included (a path).
Parse names only with `parse_ima_name` (one parser for one format).
"""
from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Mapping, Protocol

ZERO_DIGEST = bytes(32)


class EventKind(str, enum.Enum):
    BOOT_AGGREGATE = "boot_aggregate"   # first entry; name is exactly "boot_aggregate" as the kernel's
    DAEMON_START = "daemon-start"        # enforcement began (a second one in a log = an enforcement gap)
    DAEMON_STOP = "daemon-stop"
    POLICY_LOAD = "policy-load"          # digest = the policy's canonical digest
    DB_LOAD = "db-load"                  # digest = the measurement DB digest
    TLS_KEY = "tls-key"                  # digest = SHA-256 of the service's TLS SubjectPublicKeyInfo
    TRUSTED_LOAD = "trusted-load"        # first trusted load of a measurement under a label
    LABEL_TRANSITION = "label-transition"  # a process entered a TP label through its entrypoint
    VIOLATION = "violation"              # untrusted code under a label (killed/denied in enforce, allowed in audit)
    LOST_EVENTS = "lost-events"          # ring buffer overflow or map failures: always a violation
    ENGINE_ALIVE = "engine-alive"        # the engine answered a verifier's nonce: digest = alive_digest(nonce)
    VM_PART = "vm-part"                  # the host measured a Build VM's boot part: op = kernel|initrd|cmdline|policy
    VM_VTPM = "vm-vtpm"                  # the host vouches for a VM's vTPM: digest = core.vmrecord.VmRecord.digest()
    PA_LISTENER = "pa-listener"          # Port Authority let a TP take a port: digest = its program's measurement
    PA_REFUSED = "pa-refused"            # Port Authority refusals of one kind in one interval, with their count
    SELINUX_LOAD = "selinux-load"        # the cwlite SELinux module was installed: digest = its module digest,
                                         # op = module name, subject = the policy store it went into


def alive_digest(nonce: bytes) -> bytes:
    """The digest of the liveness entry the enforcement engine logs for a verifier's `nonce`: written after
    the nonce existed, by the engine itself, so a dead engine behind a live service cannot have it."""
    return hashlib.sha256(b"cwlite-engine-alive:" + nonce).digest()


@dataclass(frozen=True)
class Event:
    """One integrity-relevant event. `detail` (pid, dev, ino, ...) goes to JSON sinks, not into the PCR."""

    kind: EventKind
    digest: bytes = ZERO_DIGEST
    label: str = ""
    op: str = ""          # exec | mmap | mprotect | anon-exec | interp | open-write | ...
    subject: str = ""     # usually a path
    detail: Mapping[str, object] = field(default_factory=dict)

    def ima_name(self) -> str:
        if self.kind is EventKind.BOOT_AGGREGATE:
            return "boot_aggregate"
        return f"cwlite:{self.kind.value}:{self.label or '-'}:{self.op or '-'}:{self.subject}"


# A label-transition entry from one TP label to another names the label left in its op
# (`exec-from-<label>`; label names have no '-'), so the verifier can check it was declared.
TRANSITION_FROM = "exec-from-"


def transition_op(prev_label: str) -> str:
    """The op of a label-transition entry leaving `prev_label` ("exec" when entered from no label)."""
    return f"{TRANSITION_FROM}{prev_label}" if prev_label else "exec"


def transition_source(op: str) -> str:
    """The label a label-transition entry's op says was left ('' when none)."""
    return op[len(TRANSITION_FROM):] if op.startswith(TRANSITION_FROM) else ""


_KINDS = {k.value: k for k in EventKind}     # EventKind(value) costs a microsecond: a verifier calls this per entry


def ima_name_fields(name: str) -> tuple[EventKind, str, str, str] | None:
    """(kind, label, op, subject) of an ima-ng name cwlite wrote, or None (e.g. a kernel IMA file entry).
    The one parser of names; parse_ima_name wraps it in an Event."""
    if name == "boot_aggregate":
        return EventKind.BOOT_AGGREGATE, "", "", ""
    parts = name.split(":", 4)
    if len(parts) != 5 or parts[0] != "cwlite":
        return None
    kind = _KINDS.get(parts[1])
    if kind is None:
        return None
    return kind, ("" if parts[2] == "-" else parts[2]), ("" if parts[3] == "-" else parts[3]), parts[4]


def parse_ima_name(digest: bytes, name: str) -> Event | None:
    """The Event an ima-ng name encodes, or None for a name cwlite did not write (e.g. a kernel IMA file entry)."""
    fields = ima_name_fields(name)
    return None if fields is None else Event(fields[0], digest, *fields[1:])


@dataclass(frozen=True)
class PaSubject:
    """What a Port Authority entry's subject says: `tcp/3632,rule=1,why=peer,action=denied,count=17`
    (rule 1-based, 0 none; a listener's: `tcp/3632,rule=1,exe=/usr/bin/distccd`, exe last: a path).
    No spaces: the log keeps a name's spaces as `_`."""

    protocol: str
    port: int
    rule: int
    why: str = ""
    action: str = ""
    count: int = 0
    exe: str = ""

    def text(self) -> str:
        head = f"{self.protocol}/{self.port},rule={self.rule}"
        if self.exe:
            return f"{head},exe={self.exe}"
        return f"{head},why={self.why},action={self.action},count={self.count}"


def parse_pa_subject(subject: str) -> PaSubject | None:
    """The PaSubject a pa-listener / pa-refused entry's subject encodes, or None if malformed."""
    head, _, rest = subject.partition(",")
    proto, _, port = head.partition("/")
    fields: dict[str, str] = {}
    while rest:
        key, _, value = rest.partition("=")
        if key == "exe":
            fields["exe"] = value
            break
        value, _, rest = value.partition(",")
        fields[key] = value
    try:
        return PaSubject(proto, int(port), int(fields["rule"]), fields.get("why", ""), fields.get("action", ""),
                         int(fields.get("count", 0)), fields.get("exe", ""))
    except (KeyError, ValueError):
        return None


class EventSink(Protocol):
    """Where an engine sends events. The measurement log is the real one (write-ahead, then PCR)."""

    def record(self, event: Event) -> None: ...
