"""What a new user hit (issue 28 §1): every mistake is one `cwlite: error:` line naming the file, exit 1."""
from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.cli.main import main
from tests.unit.test_policy import GOOD


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI; assert exit 1 and exactly one `cwlite: error:` line on stderr; return it."""
    rc, _, err = run(capsys, *args)
    assert rc == 1, err
    assert err.count("\n") == 1 and err.startswith("cwlite: error: "), err
    return err.strip()


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(GOOD)
    return p


def test_check_with_a_directory_as_signature(policy: Path, tmp_path: Path, capsys) -> None:
    assert main(["policy", "keygen", str(tmp_path / "ctl")]) == 0
    (tmp_path / "policy.toml.sig").mkdir()
    err = one_line_error(capsys, "policy", "check", str(policy), "--controller-key", str(tmp_path / "ctl.pub"))
    assert f"{policy}.sig: cannot read the signature: Is a directory" in err


def test_sign_onto_a_directory(policy: Path, tmp_path: Path, capsys) -> None:
    assert main(["policy", "keygen", str(tmp_path / "ctl")]) == 0
    (tmp_path / "policy.toml.sig").mkdir()
    err = one_line_error(capsys, "policy", "sign", str(policy), "--key", str(tmp_path / "ctl.key"))
    assert f"{policy}.sig: is a directory" in err


def test_keygen_into_a_missing_directory(tmp_path: Path, capsys) -> None:
    err = one_line_error(capsys, "policy", "keygen", str(tmp_path / "missing" / "dir" / "ctl"))
    assert f"{tmp_path / 'missing' / 'dir'}: no such directory" in err
    assert not (tmp_path / "missing").exists()


def test_proof_out_directory_is_checked_before_attesting(policy: Path, tmp_path: Path, capsys) -> None:
    db = tmp_path / "trusted.db"
    db.write_bytes(b"")
    data = tmp_path / "verifier"
    out = tmp_path / "missing" / "p.json"
    err = one_line_error(capsys, "verify", "build1", "--policy", str(policy), "--db", str(db),
                         "--proof-out", str(out), "--data-dir", str(data))
    assert f"{out}: --proof-out directory {out.parent} does not exist" in err
    assert not data.exists()         # refused before the verifier key or the store were even made


def test_enrol_with_a_missing_ek_ca(tmp_path: Path, capsys) -> None:
    err = one_line_error(capsys, "enrol", "https://127.0.0.1:1", "build1", "--ek-ca", str(tmp_path / "nope.pem"),
                         "--data-dir", str(tmp_path / "verifier"))
    assert f"{tmp_path / 'nope.pem'}: cannot read the EK CA certificate: No such file or directory" in err


def test_enforce_with_events_in_a_missing_directory(policy: Path, tmp_path: Path, capsys) -> None:
    events = tmp_path / "missing" / "ev.jsonl"
    err = one_line_error(capsys, "enforce", "--policy", str(policy), "--db", str(tmp_path / "x.db"),
                         "--events", str(events))
    assert f"{events}: cannot open the events file: No such file or directory" in err


def test_usage_errors_are_one_line_exit_1(policy: Path, tmp_path: Path, capsys) -> None:
    err = one_line_error(capsys, "policy", "check", str(tmp_path))
    assert err.startswith("cwlite: error: cwlite policy check: ") and str(tmp_path) in err and "directory" in err
    err = one_line_error(capsys, "verify", "build1", "--policy", str(policy), "--db", str(tmp_path / "none.db"))
    assert "--db" in err and str(tmp_path / "none.db") in err and "does not exist" in err
    err = one_line_error(capsys, "tpm", "quote", "--nonce", "zz", "--data-dir", str(tmp_path))
    assert err.startswith("cwlite: error: cwlite tpm quote: ") and "non-hexadecimal" in err
    assert one_line_error(capsys, "no-such-command").startswith("cwlite: error: cwlite: No such command")
