"""The enforcement unit's restart is an enforcement gap the verifier sees, and its JSON log lines parse.

Runs the command line of packaging/systemd/cwlite-enforce.service (defaults
from a cwlite.toml, as the unit has them from /etc/cwlite) on the host kernel
with swtpm: SIGKILL it (what `Restart=on-failure` restarts), start it again as
systemd would, stop it. Every start logs a daemon-start entry; the verifier's
judge calls the second one an enforcement gap, so a restart is never silent.
"""
from __future__ import annotations

import configparser
import json
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

from controlplane.core.events import EventKind, parse_ima_name
from controlplane.core.policy import load_policy
from controlplane.host.mlog import read_log
from controlplane.verifier.judge import Facts, Judge, Reference, Verdict
from prima.measuredb import MeasureDB
from prima.sources import build
from tests.conftest import requires
from tests.prima_fixtures import CWLITE
from tests.tpm_fixtures import needs_swtpm, swtpm, swtpm_template  # noqa: F401

pytestmark = [requires(root=True), needs_swtpm]

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging/systemd/cwlite-enforce.service"

def _unit_command() -> list[str]:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    assert unit["Service"]["Restart"] == "on-failure"
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0] == "/usr/bin/cwlite"
    return [CWLITE, *argv[1:]]


def _start(argv: list[str], env: dict) -> tuple[subprocess.Popen, list[dict]]:
    daemon = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    lines = [json.loads(daemon.stderr.readline())]      # every stderr line is one JSON object
    assert "enforcing" in lines[0]["msg"], lines
    return daemon, lines


def test_a_restart_of_the_unit_logs_an_enforcement_gap(swtpm, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy2("/usr/bin/dash", bin_dir / "dash")
    db = tmp_path / "measure.db"
    build(db, from_dir=[bin_dir], from_dpkg=["dash"], trust_set="toolchain")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'mode = "enforce"\ntrust_sets = ["toolchain"]\n[labels.tp_build]\n'
                      f'entrypoints = ["{bin_dir / "dash"}"]\ntrust_set = "toolchain"\n')
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "cwlite.toml"
    conf.write_text(f'[enforce]\npolicy = "{policy}"\ndb = "{db}"\nmlog = true\ndata-dir = "{data}"\n'
                    f'device = "{swtpm.tcti}"\nbackend = "tracepoint"\n')
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CWLITE_CONFIG": str(conf)}
    argv = _unit_command()

    first, _ = _start(argv, env)
    first.kill()                                       # a crash: systemd restarts on-failure
    assert first.wait(30) == -signal.SIGKILL
    second, lines = _start(argv, env)
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0
    lines += [json.loads(line) for line in second.stderr.read().splitlines()]
    assert {r["component"] for r in lines} == {"cwlite enforce"} and all(r["level"] == "info" for r in lines)

    entries = read_log(data / "measurements.log")
    kinds = [parse_ima_name(e.digest, e.name).kind for e in entries]
    assert kinds.count(EventKind.DAEMON_START) == 2
    assert kinds[-1] is EventKind.DAEMON_STOP          # the clean stop; the killed one left none
    with MeasureDB.open(db) as mdb:
        judge = Judge(Reference(load_policy(policy), mdb), Facts(), pcr=entries[0].pcr)
        verdicts = [judge.judge(e) for e in entries]
    starts = [v for v in verdicts if v.kind == EventKind.DAEMON_START.value]
    assert [(v.verdict, v.reason) for v in starts] == [(Verdict.TRUSTED, ""), (Verdict.UNTRUSTED, "enforcement-gap")]
