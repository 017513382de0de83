"""/etc/cwlite/cwlite.toml as the CLI's defaults, and `--log-format json` on stderr."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.cli.config import default_map
from controlplane.cli.main import cli
from controlplane.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _cwlite(*args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({"CWLITE_CONFIG": str(config)} if config else {}))
    return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_keys_become_defaults_of_their_commands(tmp_path: Path) -> None:
    conf = tmp_path / "cwlite.toml"
    conf.write_text('data-dir = "/srv/cw"\ndb = "/srv/cw/m.db"\n[serve]\nport = 9443\nenforce = true\n'
                    '["db build"]\nnote = "nightly"\n[verify]\ndata-dir = "/srv/verifier"\n')
    m = default_map(cli, conf, required=True)
    assert m["serve"] == {"data_dir": "/srv/cw", "db_path": "/srv/cw/m.db", "port": 9443, "enforce": True}
    assert m["db"]["build"] == {"db_path": "/srv/cw/m.db", "note": "nightly"}
    assert m["verify"]["data_dir"] == "/srv/verifier"          # a command's table wins over the top level
    assert m["enforce"]["data_dir"] == "/srv/cw" and "status" not in m
    # and click uses them: the command line still wins
    assert "[default: 9443;" in _cwlite("serve", "--help", config=conf).stdout


@pytest.mark.parametrize(("text", "key", "message"), [
    ("[serve]\nprot = 1\n", "serve.prot", "`cwlite serve` has no option --prot"),
    ("[nope]\nx = 1\n", "nope", "no such command `cwlite nope`"),
    ("colour = 1\n", "colour", "no cwlite command has an option --colour"),
    ('["db"]\nnote = 1\n', "db.note", "`cwlite db` has no option --note"),
    ('["db bild"]\nnote = 1\n', "db bild", "no such command `cwlite db bild`"),
])
def test_unknown_keys_are_errors_naming_file_and_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    conf = tmp_path / "cwlite.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as info:
        default_map(cli, conf, required=True)
    assert info.value.key == key and message in str(info.value) and str(conf) in str(info.value)
    proc = _cwlite("status", config=conf)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and message in proc.stderr


def test_a_missing_file_counts_only_when_asked_for(tmp_path: Path) -> None:
    assert default_map(cli, tmp_path / "absent.toml", required=False) == {}
    proc = _cwlite("status", config=tmp_path / "absent.toml")
    assert proc.returncode == 1 and "no such configuration file (CWLITE_CONFIG)" in proc.stderr


def test_json_log_lines_parse(tmp_path: Path) -> None:
    for args in (["--log-format", "json", "policy", "check", str(tmp_path / "nope.toml")],
                 ["policy", "check", str(tmp_path / "nope.toml"), "--log-format=json"],
                 ["--log-format", "json", "policy", "check", "--no-such-option"]):
        proc = _cwlite(*args)
        assert proc.returncode == 1
        (line,) = proc.stderr.splitlines()
        record = json.loads(line)
        assert record["level"] == "error" and record["msg"].startswith("cwlite: error: ")
        assert record["pid"] > 0 and record["ts"].endswith("Z")
    # text stays what it was
    assert _cwlite("policy", "check", str(tmp_path / "nope.toml")).stderr.startswith("cwlite: error: ")
