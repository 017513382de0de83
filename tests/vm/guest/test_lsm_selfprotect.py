"""Enforcement protects itself (tests/bypass/selfprotect.py) in the VM: the lsm backend's `bpf` and
`task_kill` hooks refuse the attack with EPERM, the attacker lives, and the attack is logged.

Plus a daemon in its own process (`cwlite enforce`), which a TP's SIGKILL cannot stop.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from prima.sources import build
from tests.bypass import selfprotect as sc
from tests.bypass.backend import LSM
from tests.bypass.selfprotect import SelfProtectScenarios

pytestmark = list(LSM.marks)


@pytest.mark.usefixtures("host_root_files")  # before the lab measures system files
class TestLsmSelfProtect(SelfProtectScenarios):
    backend = LSM


def test_a_tp_cannot_sigkill_a_separate_daemon(tmp_path) -> None:
    """`cwlite enforce` as its own process: a TP's SIGKILL is refused, the daemon keeps enforcing,
    and its events file names the attempt when root stops it (SIGTERM: daemon-stop)."""
    bin_dir, other = tmp_path / "bin", tmp_path / "other"
    bin_dir.mkdir()
    other.mkdir()
    shutil.copy2("/bin/sh", bin_dir / "ep")  # the entrypoint
    shutil.copy2("/usr/bin/true", other / "true")  # never measured
    db = tmp_path / "measure.db"
    build(db, from_dir=[bin_dir], from_dpkg=["libc6"], deps=False, trust_set="lab")
    policy = tmp_path / "policy.toml"
    ep = bin_dir / "ep"
    policy.write_text(f'mode = "enforce"\ntrust_sets = ["lab"]\n[labels.tp_sp]\nentrypoints = ["{ep}"]\n'
                      'trust_set = "lab"\n')
    events = tmp_path / "events.jsonl"
    daemon = subprocess.Popen([str(Path(sys.executable).with_name("cwlite")), "enforce", "--policy", str(policy),
                               "--db", str(db), "--events", str(events), "--backend", "lsm"],
                              stderr=subprocess.PIPE, text=True)
    run_tp = lambda cmd: subprocess.run([str(bin_dir / "ep"), "-c", cmd], capture_output=True, text=True, timeout=60)
    try:
        while "enforcing" not in (line := daemon.stderr.readline()):
            assert line, "cwlite enforce did not start"
        r = run_tp(f"kill -KILL {daemon.pid}; echo rc=$?")
        assert "rc=1" in r.stdout and sc.EPERM_TEXT in r.stderr, (r.stdout, r.stderr)
        assert daemon.poll() is None
        r = run_tp(f"{other / 'true'}; echo rc=$?")
        assert "rc=126" in r.stdout, (r.stdout, r.stderr)  # still denied: the engine lives
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    [attempt] = [e for e in logged if e["op"] == "signal"]
    assert attempt["kind"] == "violation" and attempt["detail"]["action"] == "denied"
    assert attempt["subject"] == f"signal 9 to {daemon.pid}" and attempt["label"] == "tp_sp"
    assert [e for e in logged if e["op"] == "exec" and e["kind"] == "violation"]
    assert logged[-1]["kind"] == "daemon-stop"
