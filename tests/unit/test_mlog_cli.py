"""`cwlite log` and `cwlite tpm` on a real swtpm and a real log."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from controlplane.cli.main import main
from controlplane.core import imalog
from controlplane.core.events import Event, EventKind
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
    assert rc == 1 and err.count("\n") == 1 and "entry 9" in err and "matches no prefix" in err


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
