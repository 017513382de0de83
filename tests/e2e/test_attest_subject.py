"""Issue 21 end to end: an injection into a TP and an undeclared label hop, each named in the verifier's proof.

The demo slice (PRIMA tracepoint backend + swtpm + HTTPS service + verifier) in enforce
mode, with a second label (a JIT label) and the attack programs of
tests/bypass/subject.py measured in the DB. Before the attacks the proof is
"trusted"; after them it is "untrusted", naming exactly the two violation entries.
A declared transition, in the same run, stays trusted.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from controlplane.cli.demo import LABEL, Demo, prepare
from tests.conftest import requires
from tests.bypass.subject import INJECTED, Victim, build_kit

pytestmark = [requires(root=True), requires(tool="swtpm"), requires(tool="gcc"), pytest.mark.timeout(300)]

POLICY = """\
mode = "enforce"
backend = "tracepoint"
pcr = 10
trust_sets = ["demo"]

[labels.{label}]
entrypoints = ["{entry}"]
trust_set = "demo"
transitions = ["tp_helper"]

[labels.tp_jit]
entrypoints = ["{jit}"]
trust_set = "demo"
anon_exec = "allow"

[labels.tp_helper]
entrypoints = ["{helper}"]
trust_set = "demo"
anon_exec = "allow"
"""


def test_injection_and_label_hop_are_named_in_the_proof(tmp_path):
    work = tmp_path / "work"
    tp_bin = work / "tp-bin"          # prepare() measures everything in it
    tp_bin.mkdir(parents=True)
    kit = build_kit(tp_bin)
    jit, helper = tp_bin / "tp-jit", tp_bin / "tp-helper"
    shutil.copy2("/bin/sh", jit)
    shutil.copy2("/bin/sh", helper)
    layout = prepare(work, mode="enforce")
    text = POLICY.format(label=LABEL, entry=layout.entry, jit=jit, helper=helper)
    layout.policy.write_text(text)
    layout.verifier_policy.write_text(text)

    with Demo.start(layout) as demo:
        demo.enrol()
        assert demo.attest().verdict == "trusted"

        # a declared transition (tp_demo -> tp_helper, a JIT label): allowed, logged, trusted
        r = demo.run_as_tp(helper, "-c", f"'exec {kit.attack} jit'")
        assert r.stdout.strip() == INJECTED, r
        demo.wait_logged(lambda e: e.name.startswith(f"cwlite:label-transition:tp_helper:exec-from-{LABEL}:"),
                         what="the declared transition")
        assert demo.attest().verdict == "trusted"

        # 1. an unlabelled process pokes code into a running TP
        with Victim(str(layout.entry), kit) as victim:
            attacker = subprocess.Popen([kit.attack, "poke", str(victim.pid), victim.code], stdout=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True)
            out, _ = attacker.communicate(timeout=30)
            assert attacker.returncode == -9 and "poked" not in out
            assert victim.finish() == "code=7 marker=7"
        poke = demo.wait_logged(lambda e: e.name.startswith(f"cwlite:violation:{LABEL}:ptrace:"), what="the ptrace")

        # 2. the TP execs the JIT label's entrypoint, a transition its label does not declare
        r = demo.run_as_tp(jit, "-c", f"'exec {kit.attack} jit'")
        assert r.returncode in (-9, 137) and "ran" not in r.stdout, r
        hop = demo.wait_logged(lambda e: e.name.startswith(f"cwlite:violation:{LABEL}:transition:"), what="the hop")

        after = demo.attest()
    assert after.verdict == "untrusted"
    assert [(e["index"], e["reason"], e["op"], e["subject"]) for e in after.document["entries"]] == [
        (poke.index, "violation", "ptrace", f"tgid={attacker.pid}(attack,-)->tgid={victim.pid}({LABEL})"),
        (hop.index, "violation", "transition", str(jit)),
    ]
