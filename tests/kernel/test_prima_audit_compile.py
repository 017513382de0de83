"""`cwlite enforce` in audit mode while a real compile runs under a TP label: only the policy's violations are logged."""
from __future__ import annotations

import json
import shutil
import subprocess

from prima.sources import build
from tests.conftest import requires
from tests.prima_fixtures import enforce_daemon
from tests.bypass.lab import c_project

pytestmark = [requires(root=True), requires(tool="gcc")]


def test_audit_mode_during_a_compile_logs_exactly_the_unmeasured_step(tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy2("/usr/bin/make", bin_dir / "make")  # entrypoint of tp_build (test-local)
    tools = tmp_path / "tools"
    tools.mkdir()
    shutil.copy2("/usr/bin/true", tools / "stamp")  # a build step nobody measured
    db = tmp_path / "toolchain.db"
    build(db, from_dir=[bin_dir], from_dpkg=["gcc-12", "make", "binutils", "dash"], deps=True, trust_set="toolchain")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'mode = "audit"\ntrust_sets = ["toolchain"]\n[labels.tp_build]\nentrypoints = ["{bin_dir / "make"}"]\n'
                      f'trust_set = "toolchain"\n')
    src = c_project(tmp_path, units=6, extra_recipe=str(tools / "stamp"))
    events = tmp_path / "events.jsonl"
    with enforce_daemon("--policy", str(policy), "--db", str(db), "--events", str(events), "--backend", "tracepoint"):
        made = subprocess.run([str(bin_dir / "make"), "-s", "-j2", "-C", str(src)], capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr
        assert subprocess.run([str(src / "app")], capture_output=True).returncode == 0
    got = [json.loads(line) for line in events.read_text().splitlines()]
    violations = [e for e in got if e["kind"] == "violation"]
    assert [(v["op"], v["subject"], v["detail"]["action"]) for v in violations] == [("exec", str(tools / "stamp"), "allowed")]
    loaded = {e["subject"] for e in got if e["kind"] == "trusted-load" and e["label"] == "tp_build"}
    assert "/usr/lib/gcc/x86_64-linux-gnu/12/cc1" in loaded and "/usr/bin/x86_64-linux-gnu-as" in loaded
    assert any(e["kind"] == "label-transition" and e["subject"] == str(bin_dir / "make") for e in got)
