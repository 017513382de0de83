"""What a new user hit (issue 28 §1): every mistake is one `cwlite: error:` line naming the file, exit 1."""
from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from controlplane.cli.main import main
from controlplane.core.errors import MeasureDBError, PolicyError
from controlplane.core.policy import load_policy
from prima.measuredb import MeasureDB
from prima.sources import build
from tests.conftest import requires
from tests.unit.test_measuredb import _tree
from tests.unit.test_policy import GOOD

README = Path(__file__).parents[2] / "README.md"

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


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


def test_db_corrupted_mid_file_is_one_line(tmp_path: Path, capsys) -> None:
    db = tmp_path / "a.db"
    build(db, from_dir=[_tree(tmp_path / "site")], trust_set="s")
    data = bytearray(db.read_bytes())
    data[4096 + 8:4096 + 24] = bytes(16)       # page 2's cell pointers: sqlite's report spans several lines
    db.write_bytes(data)
    err = one_line_error(capsys, "db", "show", "--db", str(db))
    assert f"{db}: quick_check: On tree page 2 cell 0: Offset 0 out of range" in err and "more problems" in err


def test_db_build_into_a_missing_directory_refuses(tmp_path: Path, capsys) -> None:
    site = _tree(tmp_path / "site")
    err = one_line_error(capsys, "db", "build", "--db", str(tmp_path / "typo" / "x.db"), "--trust-set", "s",
                         "--from-dir", str(site))
    assert f"{tmp_path / 'typo'}: no such directory for the measurement DB" in err
    assert not (tmp_path / "typo").exists()


def test_db_build_from_an_empty_dir_refuses(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("not code\n")
    err = one_line_error(capsys, "db", "build", "--db", str(tmp_path / "x.db"), "--trust-set", "s",
                         "--from-dir", str(tmp_path / "empty"))
    assert f"{tmp_path / 'empty'}: --from-dir: no executable or shared object found" in err
    with MeasureDB.open(tmp_path / "x.db") as db:
        assert db.trust_sets() == []


@requires(root=True, tool="setpriv")
def test_db_as_a_user_who_may_only_read_it() -> None:
    """`db show` as nobody: a DB it may read is shown without a write; one it may not read says so."""
    shared = Path(tempfile.mkdtemp(prefix="cwlite-ro-"))     # pytest's tmp_path is 0700: nobody could not enter
    try:
        shared.chmod(0o755)
        db = shared / "trusted.db"
        build(db, from_dir=[_tree(shared / "site")], trust_set="s")
        db.chmod(0o644)
        before = db.read_bytes()
        cmd = [*NOBODY, sys.executable, "-m", "controlplane.cli", "db", "show", "--db", str(db)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
        assert proc.returncode == 0, proc.stderr
        assert "s: dir 3" in proc.stdout
        assert db.read_bytes() == before and sorted(p.name for p in shared.iterdir()) == ["site", "trusted.db"]
        db.chmod(0o600)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
        assert proc.returncode == 1
        assert proc.stderr == f"cwlite: error: {db}: cannot read the measurement DB: Permission denied\n"
    finally:
        shutil.rmtree(shared)


def test_unknown_host_hint_names_a_real_command(policy: Path, tmp_path: Path, capsys) -> None:
    db = tmp_path / "trusted.db"
    build(db, from_dir=[_tree(tmp_path / "site")], trust_set="toolchain")
    err = one_line_error(capsys, "verify", "build9", "--policy", str(policy), "--db", str(db),
                         "--data-dir", str(tmp_path / "verifier"))
    assert err.endswith("host 'build9' is not enrolled (enrol it: cwlite enrol URL build9)")
    hint = err[err.index("cwlite enrol"):-1].split()
    assert main([hint[1], "--help"]) == 0 and "URL NAME" in capsys.readouterr().out


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"cwlite {importlib.metadata.version('cwlite')}\n"


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "controlplane.cli", "policy", "check", str(tmp_path / "no.toml"),
                           "--debug"], capture_output=True, text=True, cwd=README.parent)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "PolicyError" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "controlplane.cli", "policy", "check", str(tmp_path / "no.toml")],
                          capture_output=True, text=True, cwd=README.parent)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def _proof_doc(subject: str) -> dict:
    return {"host": {"name": "build1", "url": "https://10.0.0.5:8443"}, "log": {"start": 0, "end": 3, "pcr": 10},
            "verdict": "untrusted", "reasons": ["entry 2: untrusted code"], "trusted_entries": 2,
            "entries": [{"index": 2, "verdict": "untrusted", "reason": "not-in-db", "label": "tp_build",
                         "op": "exec", "subject": subject, "digest": "ab" * 32}]}


def test_proof_show_json(tmp_path: Path, capsys) -> None:
    doc = _proof_doc("/usr/bin/evil")
    (tmp_path / "p.json").write_text(json.dumps(doc))
    rc, out, _ = run(capsys, "proof", "show", str(tmp_path / "p.json"), "--json")
    assert rc == 0 and json.loads(out) == doc


def test_piped_output_is_not_wrapped_at_80_columns(tmp_path: Path, capsys) -> None:
    """capsys is not a terminal, as a pipe or a file is not: each row must stay on one line."""
    subject = "/srv/build/" + "very-long-directory-name/" * 8 + "cc1"
    (tmp_path / "p.json").write_text(json.dumps(_proof_doc(subject)))
    rc, out, _ = run(capsys, "proof", "show", str(tmp_path / "p.json"))
    assert rc == 0
    row = [line for line in out.splitlines() if "not-in-db" in line]
    assert len(row) == 1 and subject in row[0] and "tp_build" in row[0]


def test_top_level_help_says_where_port_authority_works(capsys) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    text = " ".join(out.split())
    assert "is enforced on both backends (lsm: socket hooks; tracepoint: cgroup programs)" in text


def test_readme_trust_set_names_are_ones_the_policy_and_the_db_accept(tmp_path: Path) -> None:
    names = set(re.findall(r"--trust-set (\S+)", README.read_text()))
    assert "build-tools" in names
    site = _tree(tmp_path / "site")
    for name in names:
        policy = tmp_path / f"{name}.toml"
        policy.write_text(GOOD.replace('"toolchain"', f'"{name}"'))
        assert name in load_policy(policy).trust_sets()
        assert build(tmp_path / "x.db", from_dir=[site], trust_set=name).trust_set == name
    for bad in ("build.tools", "1tools", "-tools"):          # one rule for both: what one refuses, so does the other
        policy = tmp_path / "bad.toml"
        policy.write_text(GOOD.replace('"toolchain"', f'"{bad}"'))
        with pytest.raises(PolicyError, match="trust set names are letters, digits, _ and -"):
            load_policy(policy)
        with pytest.raises(MeasureDBError, match="trust set names are letters, digits, _ and -"):
            build(tmp_path / "x.db", from_dir=[site], trust_set=bad)
