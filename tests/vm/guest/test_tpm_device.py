"""Inside the VM: controlplane.host.tpm and the measurement log on a real /dev/tpmrm0 (the vTPM).

The guest kernel's own IMA measures into PCR 10 (its boot_aggregate), so this
is where cwlite's PCR choice is exercised for real. Every test here uses its
own PCR (14, 15, 16) so the other guest tests' PCRs are left alone.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controlplane.core import imalog
from controlplane.core.errors import LogError
from controlplane.core.events import Event, EventKind
from controlplane.core.paths import TPM_DEVICE
from controlplane.core.quote import Quote, make_credential, verify_quote
from controlplane.host import mlog
from controlplane.host.tpm import open_tpm
from tests.mlog_fault import FAULT_EXIT
from tests.tpm_fixtures import tpm2_pcrread

REPO = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, TPM2TOOLS_TCTI=f"device:{TPM_DEVICE}")


@pytest.fixture(scope="module")
def tpm(tmp_path_factory):
    with open_tpm(tmp_path_factory.mktemp("data")) as t:
        yield t


def _pcrread(pcr: int) -> bytes:
    return tpm2_pcrread(ENV, pcr)


def ev(i: int) -> Event:
    return Event(EventKind.TRUSTED_LOAD, hashlib.sha256(b"%d" % i).digest(), "tp_build", "exec", f"/usr/bin/t{i}")


def test_the_device_is_chosen(tpm) -> None:
    assert tpm.tcti == f"device:{TPM_DEVICE}" and tpm.swtpm is None


def test_pcr_choice_follows_the_kernels_ima() -> None:
    used = mlog.kernel_ima_pcrs()
    assert used, "the guest kernel's IMA log is missing"
    assert mlog.choose_pcr() == (11 if 10 in used else 10)
    if 10 in used:
        with pytest.raises(LogError, match="kernel's IMA measures into it"):
            mlog.MeasurementLog.open(Path("/tmp/never.log"), None, pcr=10)


def test_the_kernels_own_ima_log_replays_to_its_pcr(tpm) -> None:
    """mlog's parser on the live kernel log: same ASCII as the kernel prints, replay = the vTPM's PCR 10."""
    ima = Path("/sys/kernel/security/ima")
    entries = imalog.parse_binary((ima / "binary_runtime_measurements").read_bytes())
    assert imalog.to_ascii(entries) == (ima / "ascii_runtime_measurements").read_text()
    assert entries[0].name == "boot_aggregate"
    assert entries[0].digest == imalog.boot_aggregate(tpm.read_pcrs(range(10)))
    assert imalog.replay(entries, 10) == tpm.read_pcr(10) == _pcrread(10)


def test_extend_and_read_match_tpm2_pcrread(tpm) -> None:
    tpm.reset_pcr(16)
    value = bytes(32)
    for i in range(10):
        d = hashlib.sha256(b"%d" % i).digest()
        tpm.extend(16, d)
        value = hashlib.sha256(value + d).digest()
    assert tpm.read_pcr(16) == value == _pcrread(16)


def test_quote_and_credential_on_the_vtpm(tpm) -> None:
    nonce = os.urandom(32)
    q = tpm.quote(nonce, [10, 16])
    info = verify_quote(tpm.ak_public(), Quote.from_dict(q.to_dict()), nonce)
    assert info.pcr_values[10] == _pcrread(10)
    secret = os.urandom(32)
    blob, enc = make_credential(tpm.ek_public(), tpm.ak_name(), secret)
    assert tpm.activate_credential(blob, enc) == secret


def test_log_and_pcr_agree_on_the_device(tpm, tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    with mlog.MeasurementLog.open(path, tpm, pcr=14) as log:
        assert log.entries()[0].digest == imalog.boot_aggregate(tpm.read_pcrs(range(10)))
        for i in range(500):
            log.record(ev(i))
        log.flush()
        assert imalog.replay(log.entries(), 14) == tpm.read_pcr(14) == _pcrread(14)
    text = imalog.to_ascii(mlog.read_log(path))
    assert imalog.replay(imalog.parse_ascii(text), 14) == _pcrread(14)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01                             # inside the last entry's name
    path.write_bytes(bytes(data))
    with pytest.raises(LogError) as err:
        mlog.MeasurementLog.open(path, tpm, pcr=14)
    assert err.value.entry == 500


CHILD = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from controlplane.host import mlog
    from controlplane.core.events import Event, EventKind
    from controlplane.host.tpm import Tpm
    from tests.mlog_fault import crash_after_durable
    crash_after_durable(int(sys.argv[2]))
    log = mlog.MeasurementLog.open(Path(sys.argv[1]), Tpm("device:/dev/tpmrm0"), pcr=15)
    for i in range(40):
        log.record(Event(EventKind.VIOLATION, hashlib.sha256(b"%d" % i).digest(), "tp", "exec", f"/bin/{i}"))
    log.close()
""")


def test_crash_between_log_and_extend_recovers_on_the_device(tpm, tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), "20"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == FAULT_EXIT, proc.stderr
    logged = mlog.read_log(path)
    assert imalog.replay(logged, 15) != tpm.read_pcr(15)
    with mlog.MeasurementLog.open(path, tpm, pcr=15) as log:
        assert log.recovered > 0
        assert imalog.replay(logged, 15) == tpm.read_pcr(15) == _pcrread(15)
