"""`cwlite policy check|digest|sign|keygen` through the real CLI entry point."""
from __future__ import annotations

import json

from controlplane.cli.main import main
from controlplane.core.policy import load_policy
from tests.unit.test_policy import GOOD


def test_keygen_sign_check_digest(tmp_path, capsys) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD)
    assert main(["policy", "keygen", str(tmp_path / "ctl")]) == 0
    assert (tmp_path / "ctl.key").stat().st_mode & 0o777 == 0o600
    assert main(["policy", "sign", str(policy), "--key", str(tmp_path / "ctl.key")]) == 0
    capsys.readouterr()
    assert main(["policy", "check", str(policy), "--controller-key", str(tmp_path / "ctl.pub"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["signed"] is True and out["digest"] == load_policy(policy).digest().hex()
    assert out["labels"]["tp_build"]["trust_set"] == "toolchain"
    assert main(["policy", "digest", str(policy)]) == 0
    assert capsys.readouterr().out.strip() == load_policy(policy).digest().hex()


def test_check_reports_file_line_key(tmp_path, capsys) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD.replace('trust_set = "toolchain"', 'trust_set = "base"'))
    assert main(["policy", "check", str(policy)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"cwlite: error: {policy}:7: labels.tp_build.trust_set: unknown trust set 'base' (defined: core, toolchain)")


def test_keygen_never_overwrites(tmp_path, capsys) -> None:
    assert main(["policy", "keygen", str(tmp_path / "ctl")]) == 0
    before = (tmp_path / "ctl.key").read_bytes()
    assert main(["policy", "keygen", str(tmp_path / "ctl")]) == 1
    assert "exists; not overwriting a key" in capsys.readouterr().err
    assert (tmp_path / "ctl.key").read_bytes() == before
