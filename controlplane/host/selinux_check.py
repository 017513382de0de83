"""CW-Lite check of a binary SELinux policy: SETools information-flow analysis.

CW-Lite (Shankar, Jaeger, Sailer, NDSS 2006) holds when every information
flow from a low-integrity type into a high-integrity type enters through a
TP's declared filtering interface. Here:

- **low** (default `DEFAULT_LOW`): the network (`netif_type`, `node_type`,
  `port_type`, `packet_type`), untrusted login domains (`user_t`, `guest_t`,
  `xguest_t`), world-writable file types (`tmp_t`, `var_tmp_t`, `user_tmp_t`,
  `tmpfs_t`, `public_content_rw_t`). Names may be types or attributes.
- **high** (default `DEFAULT_HIGH`): the cwlite module's TP domains, their
  entrypoint types and the CDI types (its `cwlite_*` attributes).
- **trusted** (default `cwlite_t`, `null_device_t`, `zero_device_t`): types no
  path passes through. cwlite_t reads every file to *measure* it (it hashes,
  never runs or trusts the bytes); what is written to /dev/null or /dev/zero
  never reaches a reader.
- a TP domain's **filtering interface**: its network input, i.e. a step into
  the TP domain made only of network-input rules (`node`, `netif`, `packet`,
  `peer`, `association` classes; `recvfrom`/`recv_msg` on a socket class:
  labelled-networking peers), and only for a TP domain that holds a Port
  Authority port (`name_bind` on a port type). Whatever arrives that way is
  the TP's to filter; any other step into it is a violation.

A violating flow is a step `x -> h` into a high type `h` from a non-high type
`x` that is not `h`'s filtering interface, where `x` is low or is reached from
a low type on a path through neither high nor trusted types. Each is reported
once, with the shortest witness path from the nearest low type and the allow
rules that make every step (the edges of SETools' `InfoFlowAnalysis` with its
permission map; steps below `min_weight` are ignored).
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import networkx as nx
import setools
from setools.infoflow import InfoFlowStep

from controlplane.core.errors import SelinuxError

NETWORK_LOW = ("netif_type", "node_type", "port_type", "packet_type")
USER_LOW = ("user_t", "guest_t", "xguest_t")
WORLD_WRITABLE_LOW = ("tmp_t", "var_tmp_t", "user_tmp_t", "tmpfs_t", "public_content_rw_t")
DEFAULT_LOW = NETWORK_LOW + USER_LOW + WORLD_WRITABLE_LOW
DEFAULT_HIGH = ("cwlite_tp_domain", "cwlite_entry_type", "cwlite_cdi_type")
# cwlite_t: reads every file to measure it. /dev/null and /dev/zero: writing them never reaches a reader.
DEFAULT_TRUSTED = ("cwlite_t", "null_device_t", "zero_device_t")
NET_INPUT_CLASSES = frozenset({"node", "netif", "packet", "peer", "association"})
NET_PEER_PERMS = frozenset({"recvfrom", "recv_msg"})
TP_ATTR = "cwlite_tp_domain"
PORT_ATTR = "port_type"
DEFAULT_MIN_WEIGHT = 3


@dataclass(frozen=True)
class Step:
    """One information-flow step and the allow rules that make it."""

    source: str
    target: str
    weight: int
    rules: tuple[str, ...]


@dataclass(frozen=True)
class Flow:
    """A violating flow: low type -> ... -> high type, entering not through a filter."""

    low: str
    high: str
    steps: tuple[Step, ...]

    def types(self) -> list[str]:
        return [self.steps[0].source] + [s.target for s in self.steps]


@dataclass(frozen=True)
class CheckResult:
    """What `check_policy` found; `ok` is CW-Lite holding for the chosen sets."""

    policy: str
    min_weight: int
    low: tuple[str, ...]
    high: tuple[str, ...]
    trusted: tuple[str, ...]
    filters: dict[str, tuple[str, ...]]     # TP domain -> the types whose steps into it were its network input
    flows: tuple[Flow, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.flows

    def as_dict(self) -> dict:
        """JSON form: the sets, and every flow with its steps and rules."""
        return {
            "policy": self.policy, "ok": self.ok, "min_weight": self.min_weight,
            "low": list(self.low), "high": list(self.high), "trusted": list(self.trusted),
            "filters": {k: list(v) for k, v in self.filters.items()},
            "flows_into_tcb": len(self.flows),
            "high_types_reached": sorted({f.high for f in self.flows}),
            "flows": [{"low": f.low, "high": f.high, "path": f.types(),
                       "steps": [{"source": s.source, "target": s.target, "weight": s.weight, "rules": list(s.rules)}
                                 for s in f.steps]} for f in self.flows],
        }


def _expand(policy: setools.SELinuxPolicy, names: Iterable[str], what: str, *, strict: bool) -> set:
    """Types named directly or through an attribute; an unknown name is an error only when `strict`."""
    out: set = set()
    for name in names:
        try:
            obj = policy.lookup_type_or_attr(name)
        except setools.exception.InvalidType:
            if strict:
                raise SelinuxError(f"{policy}: {what}: no type or attribute {name!r} in this policy",
                                   source=str(policy), field=what) from None
            continue
        out.update(obj.expand() if isinstance(obj, setools.policyrep.TypeAttribute) else (obj,))
    return out


def load(path: str | Path) -> setools.SELinuxPolicy:
    """A binary SELinux policy (policy.NN) through SETools."""
    try:
        return setools.SELinuxPolicy(str(path))
    except (OSError, setools.exception.InvalidPolicy, ValueError) as exc:
        raise SelinuxError(f"{path}: not a readable binary SELinux policy ({exc})", source=str(path)) from exc


def _port_holders(policy: setools.SELinuxPolicy, high: set) -> set:
    """The TP domains (in `high`) holding a Port Authority port: `name_bind` on a port type."""
    try:
        tps = set(policy.lookup_typeattr(TP_ATTR).expand())
        ports = set(policy.lookup_typeattr(PORT_ATTR).expand())
    except setools.exception.InvalidType:
        return set()
    out = set()
    for tp in tps & high:
        q = setools.TERuleQuery(policy, ruletype=["allow"], source=tp, tclass=["tcp_socket", "udp_socket"], perms=["name_bind"])
        if any(set(r.target.expand()) & ports for r in q.results()):
            out.add(tp)
    return out


def _network_input(rule) -> bool:
    cls = str(rule.tclass)
    return cls in NET_INPUT_CLASSES or (cls.endswith("_socket") and set(rule.perms) <= NET_PEER_PERMS)


def _step(graph: nx.DiGraph, a, b) -> Step:
    """The step a -> b; rules naming a and b themselves come first, then those through attributes."""
    edge = InfoFlowStep(graph, a, b)
    names = {str(a), str(b)}

    def key(rule) -> tuple[int, str]:
        return (2 - len({str(rule.source), str(rule.target)} & names), str(rule))

    return Step(str(a), str(b), int(edge.weight), tuple(dict.fromkeys(str(r) for r in sorted(edge.rules, key=key))))


def check_policy(path: str | Path, *, low: Iterable[str] | None = None, high: Iterable[str] | None = None,
                 trusted: Iterable[str] | None = None, min_weight: int = DEFAULT_MIN_WEIGHT,
                 perm_map: str | Path | None = None) -> CheckResult:
    """Check CW-Lite on the binary policy at `path`; None for a set means its default (unknown defaults are skipped)."""
    pol = load(path)
    low_t = _expand(pol, DEFAULT_LOW if low is None else low, "low", strict=low is not None)
    high_t = _expand(pol, DEFAULT_HIGH if high is None else high, "high", strict=high is not None)
    trusted_t = _expand(pol, DEFAULT_TRUSTED if trusted is None else trusted, "trusted", strict=trusted is not None)
    if not high_t:
        raise SelinuxError(f"{path}: high: no high-integrity types (is the cwlite module linked in? try --high)",
                           source=str(path), field="high")
    if not 1 <= min_weight <= 10:
        raise SelinuxError(f"{path}: min_weight: {min_weight} is not a permission weight (1..10)",
                           source=str(path), field="min_weight")
    low_t -= high_t | trusted_t
    holders = _port_holders(pol, high_t)
    try:
        pmap = setools.PermissionMap(str(perm_map) if perm_map else None)
    except (OSError, setools.exception.PermissionMapParseError) as exc:
        raise SelinuxError(f"{perm_map}: not a readable permission map ({exc})", source=str(perm_map)) from exc
    ifa = setools.InfoFlowAnalysis(pol, pmap, min_weight=min_weight, exclude=sorted(trusted_t, key=str))
    for _ in ifa.infoflows(sorted(high_t, key=str)[0], out=False):   # builds ifa.subG
        break
    graph = ifa.subG
    outside = nx.restricted_view(graph, [n for n in high_t if n in graph], [])
    sources = sorted((t for t in low_t if t in outside), key=str)
    paths = nx.multi_source_dijkstra_path(outside, sources) if sources else {}
    flows = []
    filtered: dict[str, list[str]] = {}
    for h in sorted(high_t, key=str):
        if h not in graph:
            continue
        for x in sorted(graph.predecessors(h), key=str):
            if x in high_t or x not in paths:
                continue
            if h in holders and all(_network_input(r) for r in InfoFlowStep(graph, x, h).rules):
                filtered.setdefault(str(h), []).append(str(x))
                continue
            chain = paths[x] + [h]
            flows.append(Flow(str(chain[0]), str(h), tuple(_step(graph, a, b) for a, b in zip(chain, chain[1:]))))
    names = lambda ts: tuple(sorted(str(t) for t in ts))  # noqa: E731
    return CheckResult(policy=str(path), min_weight=min_weight, low=names(low_t), high=names(high_t),
                       trusted=names(trusted_t), filters={k: tuple(v) for k, v in sorted(filtered.items())},
                       flows=tuple(flows))


def draw(result: CheckResult, out: str | Path) -> Path:
    """Draw the flows into the TCB: DOT text for `.dot`, graphviz's `dot -Tpng` for `.png`."""
    out = Path(out)
    if out.suffix not in (".dot", ".png"):
        raise SelinuxError(f"{out}: --graph: want a .dot or .png file name", source=str(out), field="graph")
    high = {f.high for f in result.flows}
    lines = ["digraph cwlite_flows {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
    nodes: dict[str, str] = {}
    edges: dict[tuple[str, str], str] = {}
    for f in result.flows:
        for t in f.types():
            nodes[t] = "#f4cccc" if t in high else ("#fff2cc" if t in result.low else "#ffffff")
        for s in f.steps:
            first = s.rules[0] if s.rules else ""
            edges[(s.source, s.target)] = f"{first}" + (f" (+{len(s.rules) - 1})" if len(s.rules) > 1 else "")
    for n, colour in sorted(nodes.items()):
        lines.append(f'  "{n}" [style=filled, fillcolor="{colour}"];')
    for (a, b), label in sorted(edges.items()):
        esc = label.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'  "{a}" -> "{b}" [label="{esc}", fontsize=9];')
    lines.append("}")
    dot = "\n".join(lines) + "\n"
    if out.suffix == ".dot":
        out.write_text(dot)
        return out
    try:
        subprocess.run(["dot", "-Tpng", "-o", str(out)], input=dot.encode(), check=True, capture_output=True)
    except FileNotFoundError:
        raise SelinuxError(f"{out}: graphviz's dot is not installed (make setup installs graphviz)", source=str(out)) from None
    except subprocess.CalledProcessError as exc:
        raise SelinuxError(f"{out}: dot failed: {exc.stderr.decode(errors='replace').strip()}", source=str(out)) from None
    return out
