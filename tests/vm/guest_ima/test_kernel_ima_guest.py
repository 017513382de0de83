"""Inside the VM (Debian 6.1, `ima_policy=tcb`, vTPM): cwlite attests the kernel's own IMA log too.

The kernel measures every exec, executable mmap and root read into PCR 10 and
its binary_runtime_measurements. The attestation service serves that log at
/v1/ima-log beside cwlite's own (on PCR 11, which cwlite picks because the
kernel owns 10); the verifier quotes both PCRs, replays both logs and judges
every kernel entry against a Keylime runtime policy made from this machine's
log as it stood (a known-good baseline). A program that was not there then is
executed, and the next proof names it: unknown, with its SHA-256.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core import proof as proof_mod
from controlplane.core.policy import load_policy
from controlplane.host import mlog
from controlplane.host.kernel_ima import IMA_BINARY_LOG, KERNEL_IMA_PCR, KernelImaLog
from controlplane.host.tpm import open_tpm
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.judge import Reference
from controlplane.verifier.kernel_ima import KernelImaReference, keylime_policy, load_keylime_policy
from controlplane.verifier.store import Store
from prima.measuredb import MeasureDB
from tests.attest_fixtures import enforcement_started, make_reference, running_host


def test_a_program_run_outside_the_baseline_is_untrusted_in_the_next_proof(tmp_path, results_dir) -> None:
    kernel = KernelImaLog.if_present(IMA_BINARY_LOG)
    assert kernel is not None and len(kernel.entries()) > 1, "the kernel's IMA measures nothing (ima_policy=tcb?)"
    pcr = mlog.choose_pcr()
    assert pcr != KERNEL_IMA_PCR == kernel.pcr                     # cwlite steps aside from the kernel's PCR
    # read now, before the baseline: the kernel measures root's reads too
    payload = Path("/usr/bin/true").read_bytes() + b"\n# not the distribution's true\n"
    ref_files = make_reference(tmp_path / "verifier")
    key = Ed25519PrivateKey.generate()
    with open_tpm(tmp_path / "data") as tpm, \
            mlog.MeasurementLog.open(tmp_path / "m.log", tpm, pcr=pcr) as log, \
            running_host(tmp_path / "host", tpm=tpm, log=log, policy_path=ref_files.policy_path) as h:
        assert tpm.swtpm is None                                   # the vTPM behind /dev/tpmrm0
        h.state.kernel_ima = kernel
        enforcement_started(h, ref_files)
        db = MeasureDB.open(ref_files.db_path)
        try:
            with Store(f"sqlite:///{tmp_path}/warm.db") as warm:   # everything a round reads, read once
                registrar.enrol(h.url, "vm", warm)
                verifier.attest(warm.host("vm"), Reference(load_policy(ref_files.policy_path), db,
                                                           kernel_ima=KernelImaReference.of(db)), key, store=warm)
            baseline = tmp_path / "runtime.json"                   # a Keylime runtime policy of this machine now
            baseline.write_text(json.dumps(keylime_policy(kernel.entries())))
            kref = KernelImaReference.of(db, load_keylime_policy(baseline))
            ref = Reference(load_policy(ref_files.policy_path), db, kernel_ima=kref)
            with Store(f"sqlite:///{tmp_path}/attest.db") as store:
                registrar.enrol(h.url, "vm", store)
                assert store.host("vm").pcr == pcr
                first = verifier.attest(store.host("vm"), ref, key, store=store)
                k1 = first.document["kernel_ima"]
                assert first.verdict == "trusted", (first.reasons, k1["entries"])
                assert k1["pcr"] == KERNEL_IMA_PCR and k1["start"] == 0 and k1["end"] > 100
                assert k1["pcr_value"] == tpm.read_pcr(KERNEL_IMA_PCR).hex()
                proof_mod.check_quote(first.document)

                evil = results_dir / "not-in-the-db"               # 9p: measured (tmpfs is not, under tcb)
                evil.write_bytes(payload)
                os.chmod(evil, 0o755)
                assert subprocess.run([str(evil)]).returncode == 0
                second = verifier.attest(store.host("vm"), ref, key, store=store)
                k2 = second.document["kernel_ima"]
                assert second.verdict == "untrusted"
                assert k2["start"] == k1["end"]                    # only what is new was fetched and judged
                assert [(e["reason"], e["subject"], e["digest"]) for e in k2["entries"]] == [
                    ("unknown", str(evil), hashlib.sha256(payload).hexdigest())], k2["entries"]
                assert any("kernel IMA entries not trusted" in r for r in second.reasons)
        finally:
            db.close()
            (results_dir / "not-in-the-db").unlink(missing_ok=True)
