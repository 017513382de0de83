"""Port Authority end to end (tracepoint backend): the proof lists a TP's listener, and a TP that tries
to listen on a port no rule opens makes the next proof UNTRUSTED, naming the entry.

The demo slice (controlplane.cli.demo: swtpm, `cwlite serve --enforce`, the verifier) with a policy
that lets the demo TP listen on one loopback port. The TP's listener is a small C program built into
the TP's trusted directory, so its measurement is in the DB.
"""
from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess

import pytest

from controlplane.cli.demo import LABEL, PACKAGES, TRUST_SET, Demo, prepare
from controlplane.core import proof as proof_mod
from controlplane.core.keys import load_signing_key
from prima.sources import build
from tests.bypass.portauthority import NETHELPER_C, PaLab
from tests.conftest import requires

pytestmark = [requires(root=True), requires(tool="swtpm"), requires(tool="gcc"), pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.fixture
def layout(tmp_path):
    layout = prepare(tmp_path, mode="enforce")
    tp_bin = layout.entry.parent
    (tmp_path / "nethelper.c").write_text(NETHELPER_C)
    subprocess.run(["gcc", "-O2", "-o", str(tp_bin / "nethelper"), str(tmp_path / "nethelper.c")], check=True)
    # the DB again, now with the listener program in the TP's directory (prepare's own arguments)
    build(layout.db, from_dpkg=list(PACKAGES), deps=False, from_dir=[tp_bin], trust_set=TRUST_SET, note="pa e2e")
    shutil.copy2(layout.db, layout.verifier_db)
    port = _free_port()
    rule = f'\n[[port_authority.rules]]\nport = {port}\nlabels = ["{LABEL}"]\npeers = ["127.0.0.0/8"]\n'
    for p in (layout.policy, layout.verifier_policy):
        p.write_text(p.read_text() + rule)
    return layout, port, tp_bin / "nethelper"


def test_the_proof_lists_the_listener_and_an_unexpected_port_is_untrusted(layout) -> None:
    layout, port, helper = layout
    run = lambda *args: subprocess.Popen([str(layout.entry), "-c", " ".join(["exec", str(helper), *args])],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Demo.start(layout) as demo:
        demo.enrol()
        srv = run("listen", "127.0.0.1", str(port), "1")
        assert PaLab.first_line(srv) == f"listening {port}"
        demo.wait_logged(lambda e: e.name.startswith(f"cwlite:pa-listener:{LABEL}:listen:tcp/{port},"), what="listener")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:   # an allowed peer: served
            c.sendall(b"hi\n")
            assert c.recv(16) == b"ok\n"
        assert srv.wait(10) == 0
        first = demo.attest()
        assert first.verdict == "trusted", first.reasons
        pub = load_signing_key(layout.verifier_dir / "verifier.key").public_key()
        doc = proof_mod.check(first.proof, pub)
        assert doc["listeners"] == [f"{LABEL} tcp/{port} {hashlib.sha256(helper.read_bytes()).hexdigest()}"]

        bad = run("listen", "127.0.0.1", str(port + 1), "0")
        out, err = bad.communicate(timeout=30)
        assert bad.returncode == 3 and "bind: Operation not permitted" in err, (out, err)
        demo.wait_logged(lambda e: e.name.startswith(f"cwlite:pa-refused:{LABEL}:bind:tcp/{port + 1},"),
                         what="the refused bind")
        second = demo.attest()
    assert second.verdict == "untrusted"
    named = [v for v in second.entries if v.verdict == "untrusted"]
    assert [(v.kind, v.reason) for v in named] == [("pa-refused", "pa-bind-refused")], named
    assert named[0].subject == f"tcp/{port + 1},rule=0,why=no-rule,action=denied,count=1"
    assert proof_mod.check(second.proof, pub)["verdict"] == "untrusted"
