"""The slice end to end on this machine: PRIMA (tracepoint backend) + swtpm + HTTPS service + verifier.

A TP runs a trusted program -> proof "trusted"; then, in audit mode, an
untrusted program -> the next proof "untrusted", naming that log entry.
"""
from __future__ import annotations

import pytest

from controlplane import proof as proof_mod
from controlplane.demo import LABEL, TRUSTED_PROGRAM, Demo, prepare
from tests.conftest import requires

pytestmark = [requires(root=True), requires(tool="swtpm"), pytest.mark.timeout(300)]


def test_trusted_then_untrusted_exec_is_named_in_the_proof(tmp_path):
    layout = prepare(tmp_path)
    with Demo.start(layout) as demo:
        demo.enrol()
        r = demo.run_as_tp(TRUSTED_PROGRAM, str(layout.policy))
        assert r.returncode == 0, r.stderr
        demo.wait_logged(lambda e: e.name.endswith(TRUSTED_PROGRAM), what="trusted load")
        first = demo.attest()
        assert first.verdict == "trusted", first.reasons
        judged = {(v.kind, v.subject): v.verdict for v in first.entries}
        assert judged[("trusted-load", TRUSTED_PROGRAM)] == "trusted"
        assert judged[("label-transition", str(layout.entry))] == "trusted"

        r = demo.run_as_tp(layout.untrusted)
        assert r.returncode == 0            # audit mode: allowed, logged
        violation = demo.wait_logged(lambda e: e.name.startswith("cwlite:violation:"), what="violation")
        second = demo.attest()
        assert [v.verdict for v in demo.store.verdicts("build-vm-1")] == ["untrusted", "trusted"]

    assert second.verdict == "untrusted" and second.log_start == first.log_end
    assert second.document["entries"] == [{
        "index": violation.index, "verdict": "untrusted", "reason": "violation", "kind": "violation",
        "label": LABEL, "op": "exec", "subject": str(layout.untrusted), "digest": violation.digest.hex()}]
    pub = proof_mod.load_signing_key(layout.verifier_dir / "verifier.key").public_key()
    assert proof_mod.check(second.proof, pub)["verdict"] == "untrusted"
