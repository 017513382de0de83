"""Port Authority's decision from the policy alone (portauthority.rules, `cwlite pa show|test`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from controlplane.cli.main import main
from controlplane.core.errors import PolicyError
from controlplane.core.policy import parse_policy
from portauthority import rules

POLICY = """\
mode = "enforce"
trust_sets = ["t"]
[labels.tp_build]
entrypoints = ["/usr/bin/distccd"]
trust_set = "t"
[labels.tp_fetch]
entrypoints = ["/usr/bin/fetch"]
trust_set = "t"
[labels.tp_quiet]
entrypoints = ["/usr/bin/quiet"]
trust_set = "t"

[[port_authority.rules]]
port = 3632
labels = ["tp_build"]
peers = ["10.0.0.0/8", "fd00::/8"]

[[port_authority.rules]]
port = 8443
labels = ["tp_build"]
address = "127.0.0.1"

[[port_authority.rules]]
port = 443
op = "connect"
labels = ["tp_fetch"]
peers = ["192.0.2.0/24"]
"""


@pytest.fixture
def pol():
    return parse_policy(POLICY, source="pa.toml")


@pytest.mark.parametrize("label,op,proto,port,peer,local,allowed,index,why", [
    ("tp_build", "receive", "tcp", 3632, "10.1.2.3", None, True, 0, ""),
    ("tp_build", "accept", "tcp", 3632, "fd00::5", None, True, 0, ""),
    ("tp_build", "accept", "tcp", 3632, "192.168.1.1", None, False, 0, "peer"),
    ("tp_build", "receive", "udp", 3632, "10.1.2.3", None, False, None, "no-rule"),   # a tcp rule opens no udp
    ("tp_build", "bind", "tcp", 3632, None, None, True, 0, ""),
    ("tp_build", "bind", "tcp", 3633, None, None, False, None, "no-rule"),
    ("tp_build", "bind", "tcp", 8443, None, "127.0.0.1", True, 1, ""),
    ("tp_build", "bind", "tcp", 8443, None, None, False, 1, "address"),              # the wildcard is not 127.0.0.1
    ("tp_build", "listen", "tcp", 8443, None, None, True, 1, ""),
    ("tp_build", "bind", "tcp", 0, None, None, True, 0, ""),                          # an ephemeral port
    ("tp_quiet", "bind", "tcp", 0, None, None, False, None, "no-rule"),               # no rule at all: nothing
    ("tp_quiet", "receive", "tcp", 3632, "10.1.2.3", None, False, None, "no-rule"),
    ("tp_fetch", "connect", "tcp", 443, "192.0.2.7", None, True, 2, ""),
    ("tp_fetch", "connect", "tcp", 443, "198.51.100.1", None, False, 2, "peer"),
    ("tp_fetch", "receive", "tcp", 443, "192.0.2.7", None, True, 2, ""),             # the replies
    ("tp_fetch", "connect", "tcp", 443, "::ffff:192.0.2.7", None, True, 2, ""),      # IPv4-mapped: the IPv4 peer
    ("tp_fetch", "connect", "tcp", 443, "::ffff:198.51.100.1", None, False, 2, "peer"),
    ("tp_build", "bind", "tcp", 8443, None, "::ffff:127.0.0.1", True, 1, ""),
    ("tp_fetch", "listen", "tcp", 443, None, None, False, None, "no-rule"),
    ("", "accept", "tcp", 22, "198.51.100.1", None, True, None, "unlabelled"),
    ("", "packet", "tcp", 3632, "192.168.1.1", None, False, 0, "peer"),               # tc: a governed port
    ("", "packet", "tcp", 22, "192.168.1.1", None, True, None, ""),                   # tc: ports no rule names pass
])
def test_decide(pol, label, op, proto, port, peer, local, allowed, index, why) -> None:
    d = rules.decide(pol, label, op, proto, port, peer=peer, local=local)
    assert (d.allowed, d.index, d.why) == (allowed, index, why)
    assert d.rule is (pol.port_authority.rules[index] if index is not None else None)


def test_decide_names_bad_questions(pol) -> None:
    with pytest.raises(PolicyError, match="label 'tp_nope' is not in the policy"):
        rules.decide(pol, "tp_nope", "receive", "tcp", 1)
    with pytest.raises(PolicyError, match="op 'read'"):
        rules.decide(pol, "tp_build", "read", "tcp", 1)
    with pytest.raises(PolicyError, match="does not appear to be an IPv4 or IPv6 address"):
        rules.decide(pol, "tp_build", "receive", "tcp", 1, peer="10.1")


def test_receivers_and_kernel_rules(pol) -> None:
    assert rules.receivers(pol, "tcp", 3632) == ("tp_build",)
    assert rules.receivers(pol, "tcp", 443) == ()      # a connect rule receives only replies
    kr = rules.kernel_rules(pol, {"tp_build": 1, "tp_fetch": 2, "tp_quiet": 3})
    assert [(r.labels, r.port, r.proto) for r in kr] == [(2, 3632, 6), (2, 8443, 6), (4, 443, 6)]
    assert kr[0].nets[0][:2] == (4, 8) and kr[0].nets[0][3][:4] == bytes([255, 0, 0, 0])
    assert kr[1].local == (4, bytes([127, 0, 0, 1]) + bytes(12))
    with pytest.raises(PolicyError, match=r"port_authority.rules\[0\].labels: label 'tp_build' has no kernel id"):
        rules.kernel_rules(pol, {"tp_fetch": 2})


def test_cli_show_and_test(pol, tmp_path: Path, capsys) -> None:
    path = tmp_path / "pa.toml"
    path.write_text(POLICY)
    assert main(["pa", "show", "--policy", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["port"] for r in shown["rules"]] == [3632, 8443, 443] and shown["unlabelled"] == "unaffected"
    assert shown["backend"] in ("lsm", "tracepoint", "auto")   # the policy says auto: this kernel decides
    pinned = tmp_path / "pa-lsm.toml"
    pinned.write_text('backend = "lsm"\n' + POLICY)
    assert main(["pa", "show", "--policy", str(pinned)]) == 0
    assert "backend: lsm (the policy's backend): LSM socket_create, socket_post_create, socket_bind" in capsys.readouterr().out
    assert main(["pa", "test", "tp_build", "tcp/3632", "--from", "10.1.2.3", "--policy", str(path)]) == 0
    assert capsys.readouterr().out.startswith("allowed by port_authority.rules[0]")
    with pytest.raises(SystemExit) as info:
        main(["pa", "test", "tp_build", "tcp/3632", "--from", "192.168.1.1", "--policy", str(path), "--json"])
    assert info.value.code == 1 and json.loads(capsys.readouterr().out)["why"] == "peer"
    assert main(["pa", "test", "tp_build", "tcp/99999", "--policy", str(path)]) == 1
    assert "want PROTOCOL/PORT" in capsys.readouterr().err
