"""Transitive trust: a Build VM is judged through the host that booted it (the VMV paper's chain).

`attest_via` walks the chain, each link from the one before it:
  1. the HOST (enrolled: EK checked, AK activated) is attested as usual, its whole log replayed to its
     quote and judged; it must be TRUSTED;
  2. the host's log holds, for VM NAME, the boot parts (kernel, initrd, cmdline, policy, and the root disk
     image for a VM booted from one) and a vm-vtpm entry binding them to the vTPM's EK and AK digests
     (controlplane.core.vmrecord); each part must be the verifier's own reference (a disk the verifier
     does not expect, or one it expects and the host did not log, is a mismatch), and the vm-vtpm digest
     must be the record those entries state;
  3. the VM's attestation service presents an EK and AK whose digests are the ones the host logged: its
     quotes are checked with that AK (no enrolment of the VM: the host vouched for the key);
  4. the VM's log replays to its quote and is judged against the verifier's VM policy and DB; it must
     start with cwlite's enforcement (daemon-start) before any workload entry.
The signed proof is the VM's round with a `via` section holding both links: the host's own signed proof,
and the host-log entries that name the VM's boot parts and vTPM.
"""
from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from typing import Mapping, Sequence
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core.errors import CwliteError, VerifyError
from controlplane.core.events import EventKind
from controlplane.core.proof import digest as proof_digest
from controlplane.core.vmrecord import ALL_PARTS, PARTS, record_from_log
from controlplane.core.wire import API_VERSION
from controlplane.verifier import proofs
from controlplane.verifier.attest import Attestation, attest, judge_round, replay
from controlplane.verifier.client import Channel
from controlplane.verifier.evidence import fetch_quote
from controlplane.verifier.judge import EntryVerdict, Reference, Verdict
from controlplane.verifier.store import Host, Store

WORKLOAD_KINDS = frozenset({EventKind.TRUSTED_LOAD.value, EventKind.LABEL_TRANSITION.value, EventKind.VIOLATION.value})


@dataclass(frozen=True)
class HostLink:
    """What the host's log says about VM `name`: the entries naming its parts and its vTPM."""

    name: str
    parts: Mapping[str, EntryVerdict]
    vtpm: EntryVerdict

    def record(self):
        return record_from_log(self.name, {p: bytes.fromhex(e.digest) for p, e in self.parts.items()}, self.vtpm.subject)


@dataclass(frozen=True)
class ChainAttestation:
    """The chain's outcome: verdict and reasons, the signed proof, and each link's own results."""

    vm: str
    verdict: Verdict
    reasons: tuple[str, ...]
    proof: bytes
    document: dict
    host: Attestation
    entries: tuple[EntryVerdict, ...]       # the VM's log, judged


def host_link(name: str, host_entries: Sequence[EntryVerdict], host_name: str) -> HostLink:
    """The last vm-vtpm entry for `name` in the host's judged log and the part entries before it (back to the
    VM's previous vm-vtpm entry: a disk part of an earlier boot is not this boot's)."""
    vtpm = next((e for e in reversed(host_entries)
                 if e.kind == EventKind.VM_VTPM.value and e.subject.split(",", 1)[0] == name), None)
    if vtpm is None:
        raise VerifyError(f"{name}: host {host_name}'s log has no vm-vtpm entry for this VM: the host never booted "
                          "it with a vTPM it made (a copied or foreign vTPM state is not vouched for)",
                          reason="no-host-record")
    parts: dict[str, EntryVerdict] = {}
    for e in reversed(host_entries[: host_entries.index(vtpm)]):
        if e.kind == EventKind.VM_VTPM.value and e.subject.split(",", 1)[0] == name:
            break
        if e.kind == EventKind.VM_PART.value and e.subject == name and e.op in ALL_PARTS and e.op not in parts:
            parts[e.op] = e
    if not set(PARTS) <= set(parts):
        raise VerifyError(f"{name}: host {host_name}'s log has vm-part entries {sorted(parts)} before its vm-vtpm "
                          f"entry {vtpm.index} (expected {', '.join(PARTS)})", reason="no-host-record")
    return HostLink(name, parts, vtpm)


def check_parts(link: HostLink, expected: Mapping[str, bytes]) -> list[str]:
    """A reason for every boot part whose host-log digest is not the verifier's, naming the entry: an optional
    part (the disk) the host logged and the verifier has no reference for, or the other way round, too."""
    reasons = []
    for part in ALL_PARTS:
        entry = link.parts.get(part)
        if entry is None and part in expected:
            reasons.append(f"host log entry {link.vtpm.index} (vm-vtpm of {link.name}): the host logged no {part} "
                           f"for this boot, the verifier expects {part} {expected[part].hex()[:16]}")
        elif entry is not None and part not in expected:
            reasons.append(f"host log entry {entry.index} ({part} of VM {link.name}): {entry.digest[:16]}, and the "
                           f"verifier has no {part} reference (a VM booted from a disk image needs one)")
        elif entry is not None and bytes.fromhex(entry.digest) != expected[part]:
            reasons.append(f"host log entry {entry.index} ({part} of VM {link.name}): {entry.digest[:16]} is not "
                           f"the verifier's {part} {expected[part].hex()[:16]}")
    return reasons


def enforcement_first(verdicts: Sequence[EntryVerdict]) -> list[str]:
    """The VM's log must show cwlite's enforcement starting before any workload entry."""
    start = next((v.index for v in verdicts if v.kind == EventKind.DAEMON_START.value), None)
    work = next((v for v in verdicts if v.kind in WORKLOAD_KINDS), None)
    if start is None:
        return ["the VM's log has no daemon-start entry: cwlite never enforced in it"]
    if work is not None and work.index < start:
        return [f"VM log entry {work.index} ({work.kind} {work.subject}) precedes cwlite's enforcement "
                f"(daemon-start at entry {start})"]
    return []


def vm_url(host_url: str, port: int) -> str:
    """The VM's attestation service: the host's address, the port the host forwards to the VM."""
    return f"https://{urlsplit(host_url).hostname}:{port}"


def _vm_keys(url: str, name: str, link_record) -> tuple[bytes, bytes]:
    with Channel(url) as ch:
        claim = ch.get(f"/{API_VERSION}/enrol")
    try:
        ek, ak = base64.b64decode(claim["ek_public"], validate=True), base64.b64decode(claim["ak_public"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifyError(f"{url}: enrol claim malformed ({exc})", reason="malformed") from exc
    for what, key, want in (("EK", ek, link_record.ek_sha256), ("AK", ak, link_record.ak_sha256)):
        if hashlib.sha256(key).digest() != want:
            raise VerifyError(f"{name}: the VM at {url} presents an {what} ({hashlib.sha256(key).hexdigest()[:16]}) "
                              f"that its host did not vouch for ({want.hex()[:16]})", reason="vtpm")
    return ek, ak


def attest_via(name: str, host: Host, host_ref: Reference, vm_ref: Reference, boot: Mapping[str, bytes],
               key: Ed25519PrivateKey, *, store: Store | None = None) -> ChainAttestation:
    """Attest VM `name` through `host` (see the module docstring). `boot`: the verifier's kernel, initrd and
    cmdline digests, and the disk image's for a VM booted from one (the policy part is `vm_ref`'s policy).
    VerifyError when a link cannot be established."""
    host_att = attest(host, host_ref, key, store=store, full=True)
    link = host_link(name, host_att.entries, host.name)
    try:
        record = link.record()
    except CwliteError as exc:
        raise VerifyError(f"{name}: host log entry {link.vtpm.index}: {exc}", reason="no-host-record") from exc
    reasons = [] if host_att.verdict == Verdict.TRUSTED else [f"host {host.name} untrusted: {'; '.join(host_att.reasons)}"]
    reasons += check_parts(link, {**boot, "policy": vm_ref.policy_digest})
    if record.digest() != bytes.fromhex(link.vtpm.digest):
        reasons.append(f"host log entry {link.vtpm.index} (vm-vtpm of {name}): its digest is not the record its "
                       "subject and part entries state")
    url = vm_url(host.url, record.port)
    ek, ak = _vm_keys(url, name, record)
    vm_host = Host(name=name, url=url, ek_public=ek, ek_cert=None, ak_public=ak, pcr=record.pcr)
    nonce = os.urandom(32)
    with Channel(url) as ch:
        evidence = fetch_quote(ch, vm_host, nonce)
        replayed = replay(ch, vm_host, evidence, full=True)
    vm_verdict, vm_reasons, verdicts = judge_round(vm_host, vm_ref, evidence, replayed, nonce)
    reasons += vm_reasons + enforcement_first(verdicts)
    verdict = Verdict.UNTRUSTED if reasons else Verdict.TRUSTED
    doc = proofs.document(vm_host, vm_ref, nonce, evidence, log_start=replayed.start, log_end=replayed.end,
                          pcr_start=replayed.start_value, verdicts=verdicts, verdict=verdict, reasons=reasons,
                          previously_untrusted=0)
    doc["via"] = {
        "host": host.name, "host_url": host.url, "host_verdict": host_att.verdict.value,
        "host_proof_sha256": proof_digest(host_att.proof), "host_proof": host_att.proof.decode(),
        "vtpm_entry": {"index": link.vtpm.index, "op": link.vtpm.op, "subject": link.vtpm.subject,
                       "digest": link.vtpm.digest},
        "parts": {p: {"index": e.index, "digest": e.digest} for p, e in link.parts.items()},
        "vm_ek_sha256": record.ek_sha256.hex(), "vm_ak_sha256": record.ak_sha256.hex(),
    }
    data, checked = proofs.sign(doc, key)
    return ChainAttestation(name, verdict, tuple(reasons), data, checked, host_att, tuple(verdicts))
