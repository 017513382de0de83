"""audit -> `cwlite db suggest` -> enforce, on the host kernel (tracepoint backend), with real processes.

A TP label whose trust set is dash and what it depends on runs `tac`
(coreutils: outside the set) and a copy of `true` no package owns. The audit
run logs both; `db suggest` names coreutils at its installed version, lists the
copy as owned by no package, and proposes the rebuild. Running that command and
switching the policy to enforce then lets `tac` run and kills the copy.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from prima import debian
from prima.sources import build
from tests.conftest import requires
from tests.prima_fixtures import CWLITE, enforce_daemon

pytestmark = [requires(root=True), requires(tool="dpkg")]


def _run_labelled(policy: Path, db: Path, events: Path, script: str) -> subprocess.CompletedProcess:
    """`script` under the TP label (its entrypoint is the dash copy) while `cwlite enforce` runs."""
    with enforce_daemon("--policy", str(policy), "--db", str(db), "--events", str(events), "--backend", "tracepoint"):
        return subprocess.run([str(policy.parent / "bin" / "dash"), "-c", script], capture_output=True, text=True,
                              timeout=120)


def test_audit_suggest_enforce(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy2("/usr/bin/dash", bin_dir / "dash")      # the TP's entrypoint (test-local, from_dir)
    stamp = tmp_path / "tools" / "stamp"
    stamp.parent.mkdir()
    shutil.copy2("/usr/bin/true", stamp)                  # code no package owns
    db = tmp_path / "measure.db"
    build(db, from_dir=[bin_dir], from_dpkg=["dash"], trust_set="toolchain")
    policy = tmp_path / "policy.toml"
    text = (f'trust_sets = ["toolchain"]\n[labels.tp_build]\nentrypoints = ["{bin_dir / "dash"}"]\n'
            f'trust_set = "toolchain"\n')
    policy.write_text('mode = "audit"\n' + text)
    script = f"echo x | /usr/bin/tac && {stamp} && echo done"

    events = tmp_path / "audit.jsonl"
    ran = _run_labelled(policy, db, events, script)
    assert ran.stdout == "x\ndone\n", ran.stderr            # audit: everything ran
    audit = [json.loads(line) for line in events.read_text().splitlines()]
    assert {(e["op"], e["subject"]) for e in audit if e["kind"] == "violation"} == {("exec", "/usr/bin/tac"), ("exec", str(stamp))}

    proc = subprocess.run([CWLITE, "db", "suggest", "--db", str(db), "--policy", str(policy), "--events", str(events),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    (coreutils,) = [p for p in debian.installed_packages(["coreutils"], deps=False)]
    assert {(f["path"], f["package"], f["version"]) for f in got["files"]} == {
        ("/usr/bin/tac", "coreutils", coreutils.version), (str(stamp), None, None)}
    assert [(f["path"], f["found"]) for f in got["unowned"]] == [(str(stamp), str(stamp))]
    (ts,) = got["trust_sets"]
    assert (ts["trust_set"], ts["labels"], ts["add"], ts["already"]) == ("toolchain", ["tp_build"], ["coreutils"], [])
    # the set's recorded sources plus coreutils; the unowned copy is in no command
    assert ts["commands"] == [["cwlite", "db", "build", "--db", str(db), "--trust-set", "toolchain",
                               "--from-dpkg", "coreutils", "dash", "--from-dir", str(bin_dir)]]
    assert str(stamp) not in json.dumps(ts)

    rebuilt = subprocess.run([CWLITE, *ts["commands"][0][1:]], capture_output=True, text=True, timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stderr
    policy.write_text('mode = "enforce"\n' + text)
    events = tmp_path / "enforce.jsonl"
    ran = _run_labelled(policy, db, events, script)
    assert ran.stdout == "x\n" and ran.returncode != 0     # tac is trusted now; the copy is killed
    enforced = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["op"], e["subject"], e["detail"]["action"]) for e in enforced if e["kind"] == "violation"] == [
        ("exec", str(stamp), "killed")]
    assert any(e["kind"] == "trusted-load" and e["subject"] == "/usr/bin/tac" for e in enforced)
