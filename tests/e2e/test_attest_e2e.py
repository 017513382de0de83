"""The slice end to end on this machine: PRIMA (tracepoint backend) + swtpm + HTTPS service + verifier.

A TP runs a trusted program -> proof "trusted"; then, in audit mode, an
untrusted program -> the next proof "untrusted", naming that log entry.
"""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.cli.demo import LABEL, TRUSTED_PROGRAM, Demo, prepare
from controlplane.core import proof as proof_mod
from controlplane.core.keys import load_signing_key, public_pem
from controlplane.core.policy import load_policy, sign_policy, signature_path
from controlplane.verifier import attest as verifier
from prima.measuredb import MeasureDB
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
    pub = load_signing_key(layout.verifier_dir / "verifier.key").public_key()
    assert proof_mod.check(second.proof, pub)["verdict"] == "untrusted"


def test_a_pushed_signed_policy_is_enforced_by_the_engine(tmp_path):
    """The controller switches the host from audit to enforce over the attested channel."""
    controller = Ed25519PrivateKey.generate()
    pub = tmp_path / "controller.pub"
    pub.write_bytes(public_pem(controller.public_key()))
    layout = prepare(tmp_path / "work")
    signature_path(layout.policy).write_bytes(sign_policy(load_policy(layout.policy), controller))
    with Demo.start(layout, controller_key=pub) as demo:
        demo.enrol()
        assert demo.attest().verdict == "trusted"
        enforce_text = layout.policy.read_text().replace('mode = "audit"', 'mode = "enforce"')
        enforcing = tmp_path / "enforce.toml"
        enforcing.write_text(enforce_text)
        new = load_policy(enforcing)
        verifier.push_policy(demo.store.host("build-vm-1"), enforce_text, sign_policy(new, controller))
        # the engine reloads the pushed file and logs its own policy-load
        demo.wait_logged(lambda e: e.name.startswith("cwlite:policy-load:-:-:") and e.digest == new.digest(),
                         what="the engine's reload")
        r = demo.run_as_tp(layout.untrusted)
        assert r.returncode in (-9, 137)      # SIGKILL before the new image ran (directly, or via the shell)
        demo.wait_logged(lambda e: e.name.startswith("cwlite:violation:"), what="the violation")
        # the verifier now holds the pushed policy (and accepts the audit one it replaced)
        with MeasureDB.open(layout.verifier_db) as db:
            ref = verifier.Reference(new, db, frozenset({load_policy(layout.policy).digest()}))
            att = verifier.attest(demo.store.host("build-vm-1"), ref, demo.key, store=demo.store)
    assert att.verdict == "untrusted"
    assert [e["reason"] for e in att.document["entries"]] == ["violation"]
    assert att.document["entries"][0]["subject"] == str(layout.untrusted)
