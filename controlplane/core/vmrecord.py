"""A Build VM as its host vouches for it: boot parts and vTPM, written into the HOST's measurement log.

The host layer (`cwlite vm up`) writes these entries; the verifier reads them
back from the host's quoted log; both use this one format:

    cwlite:vm-part:-:kernel:NAME    digest = SHA-256 of the kernel image booted
    cwlite:vm-part:-:initrd:NAME    SHA-256 of the initrd (zero digest: none)
    cwlite:vm-part:-:cmdline:NAME   SHA-256 of the boot command line (UTF-8; see `cmdline_digest`)
    cwlite:vm-part:-:policy:NAME    the policy's canonical digest (what the VM's policy-load entry carries)
    cwlite:vm-part:-:disk:NAME      SHA-256 of the root disk image booted (read-only); only a VM booted from
                                    one (`vm up --disk`): a VM over the host's root has no disk entry
    cwlite:vm-vtpm:-:OP:NAME,ek=HEX,ak=HEX,pcr=N,port=N
        digest = SHA-256 of the canonical record (name, the parts, EK/AK public digests, pcr, port);
        OP is `create` (a new vTPM) or `restart` (the host's own vTPM state, booted again)

A record without a disk part has the canonical form it had before the disk
part existed, so a host log written then still verifies.

So one quoted host PCR binds the VM's name, what it booted and the vTPM whose
AK signs the VM's quotes: the transitive trust of the VMV paper.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Mapping

from controlplane.core.errors import VmError
from controlplane.core.events import Event, EventKind

PARTS = ("kernel", "initrd", "cmdline", "policy")     # every record has these
OPTIONAL_PARTS = ("disk",)                             # only a VM booted from a disk image
ALL_PARTS = PARTS + OPTIONAL_PARTS
VTPM_OPS = ("create", "restart")
NO_PART = bytes(32)                      # the digest logged for an absent part (no initrd)
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_FIELDS = ("ek", "ak", "pcr", "port")


def check_vm_name(name: str) -> str:
    """`name` if it is a VM name (lowercase letters, digits, '-'; at most 63): it goes into log names and paths."""
    if not _NAME.fullmatch(name):
        raise VmError(f"VM name {name!r}: use 1-63 lowercase letters, digits or '-' (starting with a letter or digit)",
                      reason="name", vm=name)
    return name


def cmdline_digest(cmdline: str) -> bytes:
    """What the cmdline part measures: SHA-256 of the boot command line's UTF-8 bytes."""
    return hashlib.sha256(cmdline.encode()).digest()


@dataclass(frozen=True)
class VmRecord:
    """What the host vouches for when it boots VM `name`: the boot parts' digests and the vTPM's identity."""

    name: str
    parts: Mapping[str, bytes]       # PARTS (and the OPTIONAL_PARTS it has) -> digest
    ek_sha256: bytes                 # SHA-256 of the vTPM's EK public (marshalled TPM2B_PUBLIC)
    ak_sha256: bytes                 # SHA-256 of the vTPM's AK public: the key the VM's quotes must verify with
    pcr: int                         # the PCR the VM's own measurement log extends
    port: int                        # the host port forwarded to the VM's attestation service

    def __post_init__(self) -> None:
        check_vm_name(self.name)
        missing = [p for p in PARTS if p not in self.parts]
        if missing or set(self.parts) - set(ALL_PARTS):
            raise VmError(f"VM {self.name}: boot parts {sorted(self.parts)} (expected {', '.join(PARTS)}, "
                          f"optionally {', '.join(OPTIONAL_PARTS)})", reason="record", vm=self.name)

    @property
    def part_names(self) -> tuple[str, ...]:
        """The parts this record has, in log order."""
        return tuple(p for p in ALL_PARTS if p in self.parts)

    def canonical(self) -> bytes:
        """The record's one byte form (sorted-key JSON of hex digests): what the vm-vtpm entry's digest covers."""
        body = {"name": self.name, "parts": {p: self.parts[p].hex() for p in self.part_names}, "ek_sha256": self.ek_sha256.hex(),
                "ak_sha256": self.ak_sha256.hex(), "pcr": self.pcr, "port": self.port}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        return hashlib.sha256(self.canonical()).digest()

    def subject(self) -> str:
        # ',' separates: the kernel's ima-ng names have no spaces (they become '_')
        return f"{self.name},ek={self.ek_sha256.hex()},ak={self.ak_sha256.hex()},pcr={self.pcr},port={self.port}"

    def events(self, op: str) -> list[Event]:
        """The host-log entries for one boot, in order: the parts, then the vTPM entry binding them."""
        if op not in VTPM_OPS:
            raise VmError(f"VM {self.name}: vTPM op {op!r} (expected {' or '.join(VTPM_OPS)})", reason="record",
                          vm=self.name)
        parts = [Event(EventKind.VM_PART, self.parts[p], op=p, subject=self.name) for p in self.part_names]
        return parts + [Event(EventKind.VM_VTPM, self.digest(), op=op, subject=self.subject())]


def parse_vtpm_subject(subject: str) -> tuple[str, dict[str, str]]:
    """(VM name, {ek, ak, pcr, port}) of a vm-vtpm entry's subject; VmError "record" when malformed."""
    name, *rest = subject.split(",")
    fields = dict(item.partition("=")[::2] for item in rest)
    if sorted(fields) != sorted(_FIELDS) or not _NAME.fullmatch(name):
        raise VmError(f"vm-vtpm entry subject {subject!r}: expected 'NAME,ek=HEX,ak=HEX,pcr=N,port=N'",
                      reason="record", vm=name)
    return name, fields


def record_from_log(name: str, parts: Mapping[str, bytes], vtpm_subject: str) -> VmRecord:
    """The record a host's log entries state for VM `name` (the parts' entries and the vm-vtpm entry's subject)."""
    got, fields = parse_vtpm_subject(vtpm_subject)
    if got != name:
        raise VmError(f"vm-vtpm entry names VM {got!r}, not {name!r}", reason="record", vm=name)
    try:
        return VmRecord(name, dict(parts), bytes.fromhex(fields["ek"]), bytes.fromhex(fields["ak"]),
                        int(fields["pcr"]), int(fields["port"]))
    except ValueError as exc:
        raise VmError(f"vm-vtpm entry for {name}: malformed field ({exc})", reason="record", vm=name) from exc
