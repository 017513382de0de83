"""Fault: the swtpm is SIGKILLed under a running host, then started again (issue 28 §5).

- the log refuses to go on once an extend failed (LogError), and the service refuses quotes (503):
  the verifier's round is an "error", never trusted;
- nothing lost: the entry whose extend failed was written ahead; when the restarted TPM (reset
  count + 1, PCRs at reset) opens the log, the old log is kept whole beside it (`.reset<N>`);
- the verifier sees what happened: the next round says the host restarted ("reboot"), judges the
  new boot from its first entry, and the proof is untrusted.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from controlplane.core import imalog
from controlplane.core.errors import LogError, VerifyError
from controlplane.core.events import EventKind
from controlplane.core.keys import load_signing_key
from controlplane.host.mlog import MeasurementLog, read_log
from controlplane.host.swtpm import Swtpm
from controlplane.host.tpm import Tpm
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.store import Store
from tests.attest_fixtures import enforcement_started, reference, running_host  # noqa: F401
from tests.conftest import requires
from tests.e2e.serve_process import HOST, free_port
from tests.tpm_fixtures import swtpm, swtpm_template  # noqa: F401

pytestmark = [requires(tool="swtpm"), pytest.mark.timeout(600)]
PCR = 10


def _gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read().lower():
        assert time.monotonic() < deadline, f"swtpm {pid} still running"
        time.sleep(0.05)


def test_a_killed_swtpm_stops_the_log_and_its_restart_is_a_reboot_to_the_verifier(tmp_path, swtpm, reference) -> None:
    host_dir, port = tmp_path / "host", free_port()
    path = host_dir / "measurements.log"
    host_dir.mkdir()
    key = load_signing_key(tmp_path / "verifier.key", create=True)
    ref = reference.open()
    with Store(f"sqlite:///{tmp_path}/attest.db") as store, contextlib.closing(ref.db):
        tpm = Tpm(swtpm.tcti)
        log = MeasurementLog.open(path, tpm, pcr=PCR)
        with running_host(host_dir, tpm=tpm, log=log, port=port) as host:
            enforcement_started(host, reference)
            registrar.enrol(host.url, HOST, store)
            first = verifier.attest(store.host(HOST), ref, key, store=store)
            assert first.verdict == "trusted", first.reasons
            digest = next(iter(reference.trusted.values()))

            os.kill(swtpm.pid, signal.SIGKILL)
            _gone(swtpm.pid)
            with pytest.raises(LogError):
                host.record(EventKind.TRUSTED_LOAD, digest, label="tp_build", op="exec", subject="/tools/cc")
            with pytest.raises(VerifyError) as refused:
                verifier.attest(store.host(HOST), ref, key, store=store)
            assert "HTTP 503" in str(refused.value)
            written = read_log(path)        # what was written ahead, the entry whose extend failed included
            assert written[-1].name == "cwlite:trusted-load:tp_build:exec:/tools/cc"
        log.close()
        with contextlib.suppress(Exception):   # its TPM is gone: closing may fail, nothing to keep
            tpm.close()

        restarted = Swtpm.start(swtpm.data_dir)
        try:
            with Tpm(restarted.tcti) as tpm2, MeasurementLog.open(path, tpm2, pcr=PCR) as log2:
                assert log2.archived is not None and read_log(log2.archived) == written   # nothing lost
                assert log2.entries()[0].name == "boot_aggregate" and len(log2.entries()) == 1
                with running_host(host_dir, tpm=tpm2, log=log2, port=port) as host2:
                    enforcement_started(host2, reference)
                    second = verifier.attest(store.host(HOST), ref, key, store=store)
                    assert imalog.replay(log2.entries(), PCR) == tpm2.read_pcr(PCR)
        finally:
            restarted.stop()
        verdicts = [v.verdict for v in store.verdicts(HOST)]

    assert second.verdict == "untrusted" and second.reasons[0].startswith("reboot"), second.reasons
    assert second.log_start == 0 and second.document["quote_info"]["reset_count"] > first.document["quote_info"]["reset_count"]
    assert verdicts == ["untrusted", "error", "trusted"]
