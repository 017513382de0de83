"""`cwlite pa show|test`: Port Authority's rules in force, and a dry run of its decision."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from controlplane.cli.output import emit
from controlplane.core.policy import load_policy
from ebpf.probe import probe_lsm
from portauthority import rules
from portauthority.engine import HOOKS

_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
_policy = click.option("--policy", "policy_path", required=True, envvar="CWLITE_POLICY",
                       type=click.Path(dir_okay=False, path_type=Path), help="The policy bundle (TOML; env CWLITE_POLICY).")


@click.group("pa")
def pa() -> None:
    """Port Authority: untrusted network input reaches only the TP labels its rules name.

    \b
    Examples:
      # the rules in force (scripts: --json)
      cwlite pa show --policy policy.toml
      # may tp_build receive on tcp/3632 from 10.1.2.3? (the deciding rule; exit 1 when refused)
      cwlite pa test tp_build tcp/3632 --from 10.1.2.3 --policy policy.toml
      # may it bind 127.0.0.1:3632?
      cwlite pa test tp_build tcp/3632 --op bind --local 127.0.0.1 --policy policy.toml
    """


def backend_of(requested: str) -> tuple[str, str]:
    """The backend `cwlite enforce` would run Port Authority on (PRIMA's), and how that is known:
    the policy's choice, or for "auto" a probe that loads a BPF LSM program (as `cwlite enforce` does)."""
    if requested != "auto":
        return requested, "the policy's backend"
    if os.geteuid() != 0:
        return "auto", "lsm where BPF LSM programs load, else tracepoint (run as root to probe this kernel)"
    probe = probe_lsm()
    if probe.ok:
        return "lsm", f"auto: {probe.detail}"
    return "tracepoint", f"auto: BPF LSM unavailable ({probe.detail})"


def _show_human(d: dict) -> None:
    click.echo(f"{d['policy']}: {len(d['rules'])} Port Authority rule(s); unlabelled processes: {d['unlabelled']}")
    hooks = HOOKS.get(d["backend"], "")
    click.echo(f"  backend: {d['backend']} ({d['backend_why']})" + (f": {hooks}, and tc on --pa-interface" if hooks else ""))
    for r in d["rules"]:
        peers = ", ".join(r["peers"])
        where = f" on {r['address']}" if r["address"] else ""
        click.echo(f"  [{r['index']}] {r['op']} {r['protocol']}/{r['port']} for {', '.join(r['labels'])} from {peers}{where}")
    silent = [lb for lb in d["labels"] if lb not in {x for r in d["rules"] for x in r["labels"]}]
    if silent:
        click.echo(f"  receive nothing from the network: {', '.join(silent)}")


@pa.command("show")
@_policy
@_json
def show(policy_path: Path, as_json: bool) -> None:
    """The Port Authority rules in force under the policy, the backend enforcing them, and the labels no
    rule lets receive.

    \b
    Examples:
      cwlite pa show --policy policy.toml
      cwlite pa show --policy policy.toml --json | jq '.rules[] | select(.port == 3632)'
    """
    pol = load_policy(policy_path)
    backend, why = backend_of(pol.backend)
    emit({"policy": str(policy_path), "unlabelled": pol.port_authority.unlabelled, "backend": backend,
          "backend_why": why, "rules": rules.rules_in_force(pol), "labels": sorted(pol.labels)}, as_json, _show_human)


def _endpoint(text: str) -> tuple[str, int]:
    proto, _, port = text.partition("/")
    if proto not in rules.PROTOS or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{text!r}: want PROTOCOL/PORT, e.g. tcp/3632 (protocols: {', '.join(rules.PROTOS)})")
    return proto, int(port)


@pa.command("test")
@click.argument("label")
@click.argument("endpoint", metavar="PROTOCOL/PORT")
@click.option("--from", "peer", help="The remote address (accept, receive, packet, connect, send).")
@click.option("--op", type=click.Choice(rules.OPS), default="receive", show_default=True,
              help="What the label does: PORT is local, except for connect/send (the peer's).")
@click.option("--local", help="bind: the local address (default: the wildcard).")
@_policy
@_json
def test(label: str, endpoint: str, peer: str | None, op: str, local: str | None, policy_path: Path,
         as_json: bool) -> None:
    """May LABEL (`-` = unlabelled) do --op on PROTOCOL/PORT with the peer --from? Prints the deciding
    rule; exit status 1 when refused. The same decision as ebpf/pa_decide.h's.

    \b
    Examples:
      cwlite pa test tp_build tcp/3632 --from 10.1.2.3 --policy policy.toml
      cwlite pa test tp_build tcp/80 --op connect --from 10.0.0.5 --policy policy.toml --json
      cwlite pa test - udp/53 --from 10.0.0.1 --policy policy.toml
    """
    pol = load_policy(policy_path)
    proto, port = _endpoint(endpoint)
    d = rules.decide(pol, "" if label == "-" else label, op, proto, port, peer=peer, local=local)
    emit({"label": label, "op": op, "protocol": proto, "port": port, "peer": peer, "allowed": d.allowed,
          "rule": d.index, "why": d.why, "decision": d.describe()}, as_json,
         lambda data: click.echo(data["decision"]))
    if not d.allowed:
        sys.exit(1)  # SystemExit: click's Exit would be swallowed in non-standalone mode
