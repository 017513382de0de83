"""`cwlite log` and `cwlite tpm` on a real swtpm and a real log."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from controlplane.cli.main import main
from controlplane.core import imalog
from controlplane.core.events import Event, EventKind
from controlplane.core.paths import TPM_DEVICE
from controlplane.core.quote import Quote, verify_quote
from controlplane.host import mlog
from tests.conftest import requires
from tests.tpm_fixtures import swtpm, swtpm_template, tpm  # noqa: F401

pytestmark = requires(tool="swtpm")


@pytest.fixture
def data_dir(tpm, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    with mlog.MeasurementLog.open(d / "measurements.log", tpm, pcr=11) as log:
        for i in range(8):
            log.record(Event(EventKind.TRUSTED_LOAD, hashlib.sha256(b"%d" % i).digest(), "tp", "exec", f"/bin/{i}"))
    return d


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_show_prints_the_ascii_form_and_json(data_dir: Path, capsys) -> None:
    entries = mlog.read_log(data_dir / "measurements.log")
    rc, out, _ = run(capsys, "log", "show", "--data-dir", str(data_dir))
    assert rc == 0 and out == imalog.to_ascii(entries)
    rc, out, _ = run(capsys, "log", "show", "--data-dir", str(data_dir), "--from", "6", "--json")
    assert rc == 0 and [e["index"] for e in json.loads(out)["entries"]] == [6, 7, 8]
    ascii_file = data_dir / "copy.ascii"                       # the ASCII form reads back the same
    ascii_file.write_text(imalog.to_ascii(entries))
    rc, out2, _ = run(capsys, "log", "show", "--log", str(ascii_file))
    assert rc == 0 and out2 == imalog.to_ascii(entries)


def test_verify_replays_against_the_pcr(data_dir: Path, swtpm, tpm, capsys) -> None:
    rc, out, _ = run(capsys, "log", "verify", "--data-dir", str(data_dir), "--device", swtpm.tcti, "--json")
    result = json.loads(out)
    assert rc == 0 and result["pcr"] == 11 and result["matched"] == 9 and result["pending"] == 0
    assert bytes.fromhex(result["pcr_value"]) == tpm.read_pcr(11)
    tpm.extend(11, b"\x01" * 32)                                # someone else moves the PCR
    rc, _, err = run(capsys, "log", "verify", "--data-dir", str(data_dir), "--device", swtpm.tcti)
    assert rc == 1 and err.count("\n") == 1 and "matches no prefix of the 9-entry log (entries 0..8)" in err
    assert "entry 9" not in err                                 # there is no entry 9


def test_verify_against_a_pcr_the_log_is_not_for(data_dir: Path, swtpm, capsys) -> None:
    """A PCR no entry extends replays to zero for every prefix: that is a mistake, not a match."""
    rc, _, err = run(capsys, "log", "verify", "--data-dir", str(data_dir), "--device", swtpm.tcti, "--pcr", "12")
    assert rc == 1 and err.count("\n") == 1
    assert "no entry of the 9-entry log is for PCR 12 (entry 0 is for PCR 11): give --pcr 11" in err


def test_verify_names_the_entry_whose_pcr_field_changed(data_dir: Path, swtpm, capsys) -> None:
    lines = imalog.to_ascii(mlog.read_log(data_dir / "measurements.log")).splitlines(keepends=True)
    assert lines[0].startswith("11 ")
    altered = data_dir / "altered.ascii"
    altered.write_text("12" + lines[0][2:] + "".join(lines[1:]))
    rc, _, err = run(capsys, "log", "verify", "--log", str(altered), "--pcr", "11", "--data-dir", str(data_dir),
                     "--device", swtpm.tcti)
    assert rc == 1 and err.count("\n") == 1
    assert f"{altered}: entry 0: recorded for PCR 12, not 11; PCR 11" in err


def test_tpm_commands_refuse_a_data_dir_without_a_tpm(tmp_path: Path, capsys) -> None:
    """A mistyped --data-dir must not manufacture a fresh TPM and print its zeros (no /dev/tpmrm0 here)."""
    typo = tmp_path / "typo"
    for args in (["tpm", "pcrread"], ["tpm", "quote", "--nonce", "00"], ["tpm", "info"], ["log", "verify"]):
        rc, out, err = run(capsys, *args, "--data-dir", str(typo))
        if Path(TPM_DEVICE).exists():                           # the machine's TPM answers; nothing is made
            assert not typo.exists()
            continue
        assert rc == 1 and out == "" and err.count("\n") == 1, (args, err)
        assert (f"{typo}/swtpm: no embedded TPM here" in err) or (f"{typo}/measurements.log: no such" in err), err
        assert not typo.exists()


def test_tpm_commands(swtpm, tpm, tmp_path: Path, capsys) -> None:
    tpm.extend(12, b"\x02" * 32)
    rc, out, _ = run(capsys, "tpm", "pcrread", "12", "--device", swtpm.tcti, "--json")
    assert rc == 0 and json.loads(out)["pcrs"]["12"] == tpm.read_pcr(12).hex()
    rc, out, _ = run(capsys, "tpm", "quote", "--nonce", "00ff", "--pcrs", "10,12", "--device", swtpm.tcti, "--json")
    q = json.loads(out)
    assert rc == 0 and verify_quote(tpm.ak_public(), Quote.from_dict(q["quote"]), b"\x00\xff").pcrs == (10, 12)
    rc, out, _ = run(capsys, "tpm", "info", "--device", swtpm.tcti, "--json")
    info = json.loads(out)
    assert rc == 0 and info["ak"]["name"] == tpm.ak_name().hex() and info["ek_certificate"] is True
    assert "sha256" in info["pcr_banks"]
