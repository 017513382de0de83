"""Port Authority's rules in force, and the decision they give, from the policy alone.

`decide()` answers "may label L bind/listen/accept/connect/receive on tcp/3632 with
peer 10.1.2.3?" with the rule that decides: what `cwlite pa test` prints and what
other tools (the build controller, issue 26) ask. It is the Python statement of
ebpf/pa_decide.h's `cwl_pa_decide`, rule for rule; tests/kernel/test_pa_kernel.py
holds the kernel's verdicts to this function's. `kernel_rules()` turns the policy into
the records the kernel's rule set holds (struct cwl_pa_rule).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Mapping

from controlplane.core.errors import PolicyError
from controlplane.core.policy import Policy, PortRule
from ebpf import abi

OPS = ("bind", "listen", "accept", "connect", "send", "receive", "packet")
# The op words events carry, by the header's numbers (CWL_PA_OP_BIND -> "bind").
OP_WORDS = {v: n.lower() for v, n in abi.names("CWL_PA_OP_").items()}
WHY_WORDS = {v: n.lower().replace("_", "-") for v, n in abi.names("CWL_PA_WHY_").items()}
PROTOS = {"tcp": abi.value("CWL_PA_TCP"), "udp": abi.value("CWL_PA_UDP")}
RULES_MAX = abi.value("CWL_PA_RULES")
NETS_MAX = abi.value("CWL_PA_NETS")
LABELS_MAX = 64  # a rule's label mask is 64 bits (label ids 1..63)


@dataclass(frozen=True)
class Decision:
    """The answer for one question: allowed or not, the rule that decides (allowed) or came
    closest (refused), and why not ("" when allowed; "unlabelled" when no rule applies at all)."""

    allowed: bool
    index: int | None          # 0-based index in policy.port_authority.rules
    rule: PortRule | None
    why: str

    def describe(self) -> str:
        """One line: `allowed by port_authority.rules[0] (listen tcp/3632 for tp_build from 10.0.0.0/8)`."""
        verdict = "allowed" if self.allowed else "refused"
        if self.why == "unlabelled":
            return "allowed: unlabelled processes are unaffected (port_authority.unlabelled = \"unaffected\")"
        if self.rule is None:
            if self.allowed:
                return "allowed: no listen rule governs this port (tc leaves it to unlabelled processes)"
            return f"refused ({self.why}): no rule of this label for it"
        text = f"{verdict} by port_authority.rules[{self.index}] ({describe_rule(self.rule)})"
        return text if self.allowed else f"refused ({self.why}): closest is port_authority.rules[{self.index}] ({describe_rule(self.rule)})"


def describe_rule(rule: PortRule) -> str:
    """`listen tcp/3632 for tp_build from 10.0.0.0/8 on 127.0.0.1`."""
    peers = "any peer" if set(rule.peers) == {"0.0.0.0/0", "::/0"} else ", ".join(rule.peers)
    where = f" on {rule.address}" if rule.address else ""
    return f"{rule.op} {rule.protocol}/{rule.port} for {', '.join(rule.labels)} from {peers}{where}"


def _unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """::ffff:a.b.c.d is a.b.c.d, as net.bpf.c judges it (IPv4 on the wire)."""
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


def _in_peers(rule: PortRule, peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    if peer is None:
        return False
    return any(peer in ipaddress.ip_network(n) for n in rule.peers)


def decide(policy: Policy, label: str, op: str, protocol: str, port: int, *, peer: str | None = None,
           local: str | None = None) -> Decision:
    """The decision of ebpf/pa_decide.h for `label` ("" = unlabelled) doing `op` on `protocol`/`port`.

    `port` is the local port for bind/listen/accept/receive/packet and the peer's port for
    connect/send; `peer` the remote address (accept, receive, packet, connect, send); `local` the
    address bound (bind; None: the wildcard). A receive also matches a connect rule whose port is
    the packet's source port: pass that as `port` with op "receive" to ask about replies.
    """
    if op not in OPS:
        raise PolicyError(f"op {op!r}: not one of {', '.join(OPS)}")
    if protocol not in PROTOS:
        raise PolicyError(f"protocol {protocol!r}: not one of {', '.join(PROTOS)}")
    if label and label not in policy.labels:
        raise PolicyError(f"{policy.source}: label {label!r} is not in the policy (labels: {', '.join(sorted(policy.labels))})")
    try:
        peer_ip = _unmapped(ipaddress.ip_address(peer)) if peer else None
        local_ip = _unmapped(ipaddress.ip_address(local)) if local else None
    except ValueError as exc:
        raise PolicyError(f"address: {exc}") from None
    if not label and op != "packet":
        return Decision(True, None, None, "unlabelled")
    closest: tuple[int, str] | None = None
    for i, r in enumerate(policy.port_authority.rules):
        if r.protocol != protocol or (op != "packet" and label not in r.labels):
            continue
        if r.op == "listen":
            if op == "bind" and port == 0:
                return Decision(True, i, r, "")
            if r.port != port or op in ("connect", "send"):
                continue
            if op == "bind":
                if r.address and (local_ip is None or ipaddress.ip_address(r.address) != local_ip):
                    closest = (i, "address")
                    continue
                return Decision(True, i, r, "")
            if op == "listen":
                return Decision(True, i, r, "")
        else:
            if op == "bind" and port == 0:
                return Decision(True, i, r, "")
            if r.port != port or op not in ("connect", "send", "receive"):
                continue
        if not _in_peers(r, peer_ip):
            closest = (i, "peer")
            continue
        return Decision(True, i, r, "")
    if op == "packet":  # tc: refused only when a listen rule governs the port
        if closest is None:
            return Decision(True, None, None, "")
        return Decision(False, closest[0], policy.port_authority.rules[closest[0]], closest[1])
    if closest is None:
        return Decision(False, None, None, "no-rule")
    return Decision(False, closest[0], policy.port_authority.rules[closest[0]], closest[1])


@dataclass(frozen=True)
class KernelRule:
    """One struct cwl_pa_rule's fields (portauthority.engine packs them)."""

    labels: int
    port: int
    proto: int
    kind: int
    nets: tuple[tuple[int, int, bytes, bytes], ...]   # (family, prefix, 16 address bytes, 16 mask bytes)
    local: tuple[int, bytes] | None            # (family, 16 bytes) or None = any


def _family(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return abi.value("CWL_PA_INET") if ip.version == 4 else abi.value("CWL_PA_INET6")


def kernel_rules(policy: Policy, label_ids: Mapping[str, int]) -> list[KernelRule]:
    """The policy's rules as the kernel holds them; limits the kernel has are errors naming the field."""
    rules = policy.port_authority.rules
    if len(rules) > RULES_MAX:
        raise PolicyError(f"{policy.source}: port_authority.rules: {len(rules)} rules; the kernel's rule set holds {RULES_MAX}")
    out = []
    for i, r in enumerate(rules):
        where = f"{policy.source}: port_authority.rules[{i}]"
        mask = 0
        for name in r.labels:
            lid = label_ids.get(name)
            if lid is None or not 0 < lid < LABELS_MAX:
                raise PolicyError(f"{where}.labels: label {name!r} has no kernel id below {LABELS_MAX}")
            mask |= 1 << lid
        nets = []
        if set(r.peers) != {"0.0.0.0/0", "::/0"}:
            if len(r.peers) > NETS_MAX:
                raise PolicyError(f"{where}.peers: {len(r.peers)} networks; a rule holds {NETS_MAX}")
            for text in r.peers:
                net = ipaddress.ip_network(text)
                nets.append((_family(net.network_address), net.prefixlen, net.network_address.packed.ljust(16, b"\0"),
                             net.netmask.packed.ljust(16, b"\0")))
        local = None
        if r.address:
            ip = ipaddress.ip_address(r.address)
            local = (_family(ip), ip.packed.ljust(16, b"\0"))
        kind = abi.value("CWL_PA_RULE_LISTEN") if r.op == "listen" else abi.value("CWL_PA_RULE_CONNECT")
        out.append(KernelRule(mask, r.port, PROTOS[r.protocol], kind, tuple(nets), local))
    return out


def rules_in_force(policy: Policy) -> list[dict[str, object]]:
    """The rules as data (`cwlite pa show --json`, the build controller): index, op, protocol, port,
    labels, peers, address."""
    return [{"index": i, "op": r.op, "protocol": r.protocol, "port": r.port, "labels": list(r.labels),
             "peers": list(r.peers), "address": r.address or None}
            for i, r in enumerate(policy.port_authority.rules)]


def receivers(policy: Policy, protocol: str, port: int) -> tuple[str, ...]:
    """The labels a listen rule lets receive on `protocol`/`port` (e.g. only distccd's label on tcp/3632)."""
    return tuple(sorted({lb for r in policy.port_authority.rules if r.op == "listen" and r.protocol == protocol
                         and r.port == port for lb in r.labels}))
