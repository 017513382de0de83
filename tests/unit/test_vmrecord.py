"""The VM record the host logs and the verifier reads back (core.vmrecord), and the chain's pure checks."""
from __future__ import annotations

import hashlib

import pytest

from controlplane.core.errors import VerifyError, VmError
from controlplane.core.events import Event, EventKind, parse_ima_name
from controlplane.core.imalog import LogEntry
from controlplane.core.digest import sha256_file
from controlplane.core.vmrecord import ALL_PARTS, PARTS, VmRecord, check_vm_name, parse_vtpm_subject, record_from_log
from controlplane.verifier import chain
from controlplane.verifier.judge import EntryVerdict, Verdict

PARTS_OF = {p: hashlib.sha256(p.encode()).digest() for p in PARTS}
RECORD = VmRecord("vm1", PARTS_OF, b"\x01" * 32, b"\x02" * 32, 11, 40123)
DISK = hashlib.sha256(b"disk").digest()
DISK_RECORD = VmRecord("vm1", {**PARTS_OF, "disk": DISK}, b"\x01" * 32, b"\x02" * 32, 11, 40123)


def judged(events: list[Event], start: int = 0) -> list[EntryVerdict]:
    """The entries as a host log carries them (through the ima-ng name), as the verifier's judge lists them."""
    out = []
    for i, ev in enumerate(events, start):
        entry = LogEntry.new(i, 10, ev.digest, ev.ima_name())
        back = parse_ima_name(entry.digest, entry.name)
        out.append(EntryVerdict(i, Verdict.INFO, "", back.kind.value, back.label, back.op, back.subject,
                                entry.digest.hex()))
    return out


def test_the_record_survives_the_host_log_and_binds_every_field() -> None:
    entries = judged(RECORD.events("create"))
    assert [(e.kind, e.op) for e in entries] == [("vm-part", p) for p in PARTS] + [("vm-vtpm", "create")]
    link = chain.host_link("vm1", entries, "host")
    assert link.record() == RECORD and link.record().digest().hex() == link.vtpm.digest
    for changed in (VmRecord("vm1", {**PARTS_OF, "kernel": b"\x09" * 32}, RECORD.ek_sha256, RECORD.ak_sha256, 11, 40123),
                    VmRecord("vm1", PARTS_OF, RECORD.ek_sha256, b"\x03" * 32, 11, 40123),
                    VmRecord("vm1", PARTS_OF, RECORD.ek_sha256, RECORD.ak_sha256, 11, 40124)):
        assert changed.digest() != RECORD.digest()


def test_the_last_record_of_the_named_vm_is_used() -> None:
    other = VmRecord("vm2", PARTS_OF, b"\x05" * 32, b"\x06" * 32, 11, 1)
    restarted = VmRecord("vm1", {**PARTS_OF, "cmdline": b"\x07" * 32}, RECORD.ek_sha256, RECORD.ak_sha256, 11, 40123)
    entries = judged(RECORD.events("create") + other.events("create") + restarted.events("restart"))
    link = chain.host_link("vm1", entries, "host")
    assert link.vtpm.op == "restart" and link.record() == restarted
    assert chain.host_link("vm2", entries, "host").record() == other


def test_parts_that_differ_are_named_by_their_host_log_entry() -> None:
    link = chain.host_link("vm1", judged(RECORD.events("create"), start=7), "host")
    assert chain.check_parts(link, PARTS_OF) == []
    reasons = chain.check_parts(link, {**PARTS_OF, "kernel": b"\x0a" * 32, "policy": b"\x0b" * 32})
    assert [r.split(":")[0] for r in reasons] == ["host log entry 7 (kernel of VM vm1)",
                                                   "host log entry 10 (policy of VM vm1)"]


def test_a_vm_the_host_never_vouched_for_is_refused() -> None:
    with pytest.raises(VerifyError) as err:
        chain.host_link("vm9", judged(RECORD.events("create")), "host")
    assert err.value.reason == "no-host-record"
    parts_missing = judged(RECORD.events("create")[2:])
    with pytest.raises(VerifyError) as err:
        chain.host_link("vm1", parts_missing, "host")
    assert err.value.reason == "no-host-record"


def test_enforcement_must_start_before_any_workload_entry() -> None:
    boot = [Event(EventKind.BOOT_AGGREGATE, b"\x01" * 32), Event(EventKind.DAEMON_START, subject="prima/lsm")]
    work = [Event(EventKind.LABEL_TRANSITION, b"\x02" * 32, label="tp", op="exec", subject="/usr/bin/distccd")]
    assert chain.enforcement_first(judged(boot + work)) == []
    late = chain.enforcement_first(judged(boot[:1] + work + boot[1:]))
    assert late and late[0].startswith("VM log entry 1 (label-transition /usr/bin/distccd) precedes")
    assert "no daemon-start" in chain.enforcement_first(judged(boot[:1] + work))[0]


@pytest.mark.parametrize("name", ["", "Vm1", "vm 1", "vm,1", "a" * 64, "-vm"])
def test_vm_names_that_cannot_go_into_log_names_or_paths_are_refused(name: str) -> None:
    with pytest.raises(VmError) as err:
        check_vm_name(name)
    assert err.value.reason == "name"


def test_malformed_vtpm_subjects_are_refused() -> None:
    assert parse_vtpm_subject(RECORD.subject())[0] == "vm1"
    for subject in ("vm1", "vm1,ek=00,ak=00,pcr=1", "vm1,ek=00,ak=00,pcr=1,port=2,x=3"):
        with pytest.raises(VmError):
            parse_vtpm_subject(subject)
    with pytest.raises(VmError):
        record_from_log("vm1", PARTS_OF, "vm1,ek=zz,ak=00,pcr=1,port=2")


def test_a_record_without_a_disk_keeps_the_canonical_form_of_four_part_records() -> None:
    """Host logs written before the disk part existed still verify: the digest of a four-part record is the
    one computed then (this literal is that form)."""
    want = ('{"ak_sha256":"' + "02" * 32 + '","ek_sha256":"' + "01" * 32 + '","name":"vm1","parts":{'
            + ",".join(f'"{p}":"{PARTS_OF[p].hex()}"' for p in sorted(PARTS)) + '},"pcr":11,"port":40123}')
    assert RECORD.canonical() == want.encode()
    assert RECORD.digest() == hashlib.sha256(want.encode()).digest()
    assert [e.op for e in RECORD.events("create")] == [*PARTS, "create"]


def test_the_disk_is_a_fifth_part_bound_by_the_vtpm_entry() -> None:
    entries = judged(DISK_RECORD.events("create"))
    assert [(e.kind, e.op) for e in entries] == [("vm-part", p) for p in ALL_PARTS] + [("vm-vtpm", "create")]
    link = chain.host_link("vm1", entries, "host")
    assert link.record() == DISK_RECORD and link.record().digest().hex() == link.vtpm.digest
    assert DISK_RECORD.digest() != RECORD.digest()
    other = VmRecord("vm1", {**PARTS_OF, "disk": b"\x09" * 32}, DISK_RECORD.ek_sha256, DISK_RECORD.ak_sha256, 11, 40123)
    assert other.digest() != DISK_RECORD.digest()
    with pytest.raises(VmError) as err:
        VmRecord("vm1", {**PARTS_OF, "rootfs": DISK}, b"\x01" * 32, b"\x02" * 32, 11, 1)
    assert err.value.reason == "record"


def test_a_disk_that_differs_or_is_missing_on_either_side_is_named() -> None:
    link = chain.host_link("vm1", judged(DISK_RECORD.events("create"), start=3), "host")
    assert chain.check_parts(link, {**PARTS_OF, "disk": DISK}) == []
    other = b"\x0c" * 32
    changed = chain.check_parts(link, {**PARTS_OF, "disk": other})
    assert changed == [f"host log entry 7 (disk of VM vm1): {DISK.hex()[:16]} is not the verifier's disk "
                       f"{other.hex()[:16]}"]
    # the verifier expects a VM over its host's root; the host booted a disk image
    unexpected = chain.check_parts(link, PARTS_OF)
    assert len(unexpected) == 1 and unexpected[0].startswith("host log entry 7 (disk of VM vm1):")
    # the verifier expects a disk; the host logged none for this boot: named by the vm-vtpm entry
    plain = chain.host_link("vm1", judged(RECORD.events("create"), start=3), "host")
    missing = chain.check_parts(plain, {**PARTS_OF, "disk": DISK})
    assert len(missing) == 1 and missing[0].startswith("host log entry 7 (vm-vtpm of vm1): the host logged no disk")


def test_a_disk_entry_of_an_earlier_boot_is_not_this_boots() -> None:
    """A VM made from a disk image, then booted over its host's root: the later record has no disk part, and the
    earlier boot's disk entry (before the earlier vm-vtpm entry) is not taken for it."""
    later = VmRecord("vm1", PARTS_OF, DISK_RECORD.ek_sha256, DISK_RECORD.ak_sha256, 11, 40123)
    entries = judged(DISK_RECORD.events("create") + later.events("restart"))
    link = chain.host_link("vm1", entries, "host")
    assert "disk" not in link.parts and link.record() == later
    assert link.record().digest().hex() == link.vtpm.digest


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path) -> None:
    f = tmp_path / "part"
    f.write_bytes(b"x" * 100_000)
    assert sha256_file(f) == hashlib.sha256(b"x" * 100_000).digest()
