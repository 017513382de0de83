"""`cwlite enforce` as a real daemon: a real measurement DB, real kills, SIGHUP reload, SIGTERM detach, events file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prima.sources import build
from tests.conftest import requires
from tests.tpm_fixtures import swtpm, swtpm_template  # noqa: F401

pytestmark = requires(root=True)

CWLITE = str(Path(sys.executable).with_name("cwlite"))


def _wait_line(stream, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not seen")


@contextlib.contextmanager
def _daemon(*args: str):
    """`cwlite enforce ARGS` until it says it is enforcing; on leaving, SIGTERM and a clean detach."""
    proc = subprocess.Popen([CWLITE, "enforce", *args], stderr=subprocess.PIPE, text=True)
    try:
        _wait_line(proc.stderr, "enforcing")
        yield proc
        proc.send_signal(signal.SIGTERM)
        _wait_line(proc.stderr, "detached")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def site(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy2("/bin/sh", bin_dir / "ep")
    shutil.copy2("/usr/bin/true", bin_dir / "true")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy2("/usr/bin/false", other / "false")  # not measured at first
    db = tmp_path / "measure.db"
    build(db, from_dir=[bin_dir], from_dpkg=["libc6"], deps=False, trust_set="lab")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'mode = "enforce"\ntrust_sets = ["lab"]\n[labels.tp_cli]\nentrypoints = ["{bin_dir / "ep"}"]\n'
                      f'trust_set = "lab"\n')
    return tmp_path, bin_dir, other, db, policy


def test_enforce_daemon_kills_reloads_and_detaches(site) -> None:
    tmp, bin_dir, other, db, policy = site
    events = tmp / "events.jsonl"
    with _daemon("--policy", str(policy), "--db", str(db), "--events", str(events), "--backend", "tracepoint") as proc:
        ep = str(bin_dir / "ep")
        run = lambda s: subprocess.run([ep, "-c", s], capture_output=True, text=True, timeout=30).stdout.strip()
        assert run(f"{bin_dir / 'true'}; echo rc=$?") == "rc=0"
        assert run(f"{other / 'false'}; echo rc=$?") == "rc=137"
        # measure the other directory too, then SIGHUP: the file is now trusted
        build(db, from_dir=[bin_dir, other], from_dpkg=["libc6"], deps=False, trust_set="lab")
        proc.send_signal(signal.SIGHUP)
        _wait_line(proc.stderr, "reloaded")
        assert run(f"{other / 'false'}; echo rc=$?") == "rc=1"
        # a broken policy on reload is refused; the previous one stays enforced
        policy.write_text(policy.read_text() + "bogus = 1\n")
        proc.send_signal(signal.SIGHUP)
        assert "bogus: unknown key" in _wait_line(proc.stderr, "reload refused")
        shutil.copy2(bin_dir / "true", tmp / "x")  # unmeasured
        assert run(f"{tmp}/x; echo rc=$?") == "rc=137"
    # programs detached: the label no longer means anything
    assert subprocess.run([str(bin_dir / "ep"), "-c", f"{tmp}/x; echo rc=$?"], capture_output=True,
                          text=True).stdout.strip() == "rc=0"
    got = _events(events)
    kinds = [e["kind"] for e in got]
    assert kinds[:3] == ["daemon-start", "policy-load", "db-load"] and kinds[-1] == "daemon-stop"
    assert kinds.count("policy-load") == 2 and kinds.count("db-load") == 2
    violations = [e for e in got if e["kind"] == "violation"]
    assert [v["op"] for v in violations] == ["exec", "reload", "exec"]
    assert violations[0]["subject"] == str(other / "false") and violations[0]["detail"]["action"] == "killed"
    assert violations[0]["ima_name"] == f"cwlite:violation:tp_cli:exec:{other / 'false'}"
    # the daemon measured the very file that ran (the kernel records no content hash): an operator can add it
    false_sha = hashlib.sha256((other / "false").read_bytes()).hexdigest()
    assert violations[0]["digest"] == violations[0]["detail"]["sha256"] == false_sha
    assert violations[2]["digest"] == hashlib.sha256((tmp / "x").read_bytes()).hexdigest()
    assert any(e["kind"] == "label-transition" and e["subject"] == str(bin_dir / "ep") for e in got)
    assert len({e["digest"] for e in got if e["kind"] == "db-load"}) == 2  # the DB digest changed


def test_enforce_refuses_a_policy_naming_a_trust_set_the_db_lacks(site) -> None:
    tmp, bin_dir, other, db, policy = site
    policy.write_text(policy.read_text().replace('["lab"]', '["lab", "extra"]'))
    r = subprocess.run([CWLITE, "enforce", "--policy", str(policy), "--db", str(db)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == f"cwlite: error: {policy}: trust_sets: extra not in {db} (has: lab)"


@requires(tool="swtpm_setup")
def test_enforce_records_into_the_measurement_log(site, swtpm) -> None:
    """--mlog: every event is an ima-ng entry extended into the policy's PCR (real swtpm)."""
    from controlplane.core import imalog
    from controlplane.host import mlog
    from controlplane.host.tpm import Tpm

    tmp, bin_dir, other, db, policy = site
    policy.write_text(policy.read_text().replace('mode = "enforce"', 'mode = "enforce"\npcr = 11'))
    data = tmp / "data"
    data.mkdir()
    with _daemon("--policy", str(policy), "--db", str(db), "--mlog", "--data-dir", str(data), "--device", swtpm.tcti,
                 "--backend", "tracepoint"):
        r = subprocess.run([str(bin_dir / "ep"), "-c", f"{other / 'false'}; echo rc=$?"], capture_output=True, text=True)
        assert r.stdout.strip() == "rc=137"
    entries = mlog.read_log(data / "measurements.log")
    names = [e.name for e in entries]
    assert names[0] == "boot_aggregate" and names[1] == "cwlite:daemon-start:-:-:prima/tracepoint"
    assert f"cwlite:violation:tp_cli:exec:{other / 'false'}" in names and names[-1] == "cwlite:daemon-stop:-:-:prima/tracepoint"
    violation = entries[names.index(f"cwlite:violation:tp_cli:exec:{other / 'false'}")]
    assert violation.digest == hashlib.sha256((other / "false").read_bytes()).digest()   # in the PCR, not zeros
    with Tpm(swtpm.tcti) as tpm:
        assert imalog.replay(entries, 11) == tpm.read_pcr(11)
