"""Inside the VM: attestation against the real /dev/tpmrm0 (the vTPM behind the kernel's resource manager).

Enrolment by credential activation on the device's EK, quotes bound to the
service's TLS key, replay on a PCR of its own (13: the guest kernel's IMA owns
10, other guest tests use 11 and 14-16), and the log's boot_aggregate checked
against PCRs 0-9 as the guest's firmware left them. (Relays, replays and the
other refusals are proved on the host with swtpm: tests/unit/test_attestation.py.)
"""
from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core import imalog
from controlplane.host import mlog

from controlplane.verifier import registrar

from controlplane.verifier import attest as verifier
from controlplane.core.events import EventKind
from controlplane.verifier.store import Store
from controlplane.host.tpm import open_tpm
from tests.attest_fixtures import enforcement_started, make_reference, running_host

PCR = 13


def test_attest_on_the_vtpm(tmp_path) -> None:
    ref = make_reference(tmp_path / "verifier")
    key = Ed25519PrivateKey.generate()
    with open_tpm(tmp_path / "data") as tpm, \
            mlog.MeasurementLog.open(tmp_path / "m.log", tpm, pcr=PCR) as log, \
            running_host(tmp_path / "host", tpm=tpm, log=log, policy_path=ref.policy_path) as h, \
            Store(f"sqlite:///{tmp_path}/attest.db") as store:
        assert tpm.swtpm is None                          # the device, not an embedded swtpm
        firmware = tpm.read_pcrs(list(range(10)))
        assert any(v != bytes(32) for v in firmware.values()), "firmware measured nothing into PCRs 0-9"
        enforcement_started(h, ref)
        registrar.enrol(h.url, "vm", store, pcr=PCR)
        r = ref.open()
        try:
            first = verifier.attest(store.host("vm"), r, key, store=store)
            assert first.verdict == "trusted", first.reasons
            assert log.entries(0)[0].digest == imalog.boot_aggregate(firmware)
            h.record(EventKind.VIOLATION, b"\x66" * 32, label="tp_build", op="exec", subject="/tmp/evil")
            second = verifier.attest(store.host("vm"), r, key, store=store)
            assert second.verdict == "untrusted"
            assert [(e["reason"], e["subject"]) for e in second.document["entries"]] == [("violation", "/tmp/evil")]
        finally:
            r.db.close()
