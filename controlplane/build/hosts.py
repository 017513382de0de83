"""The build hosts file, and the Port Authority condition a build host must meet.

    # build-hosts.toml: one table per host, by the name it was enrolled under
    [[hosts]]
    name = "build1"             # `cwlite enrol URL build1`
    distcc = "10.0.0.2:3632"    # where its distccd listens
    jobs = 2                    # distcc's /LIMIT for it
    label = "tp_build"          # the TP label distccd runs under (default: the policy's label entered by distccd)
"""
from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.core.errors import FileError, PolicyError

DEFAULT_HOSTS = Path("/etc/cwlite/build-hosts.toml")
DISTCCD = "distccd"
KEYS = {"name", "distcc", "jobs", "label"}


@dataclass(frozen=True)
class BuildHost:
    """One distcc host: its enrolled name, distccd's address and port, its job limit, its TP label."""

    name: str
    address: str
    port: int
    jobs: int = 2
    label: str = ""

    @property
    def distcc(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def spec(self) -> str:
        """The distcc host specification (distcc(1)): ADDR:PORT/LIMIT."""
        return f"{self.distcc}/{self.jobs}"


def load_hosts(path: Path) -> tuple[BuildHost, ...]:
    """Parse the hosts file; FileError naming `file: hosts[i].key` for anything wrong."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise FileError.from_os(path, exc, "read the build hosts file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise FileError(f"{path}: not TOML: {exc}", path=str(path)) from exc
    rows = data.get("hosts")
    if set(data) != {"hosts"} or not isinstance(rows, list) or not rows:
        raise FileError(f"{path}: expected one or more [[hosts]] tables and nothing else", path=str(path))
    out: list[BuildHost] = []
    for i, row in enumerate(rows):
        where = f"{path}: hosts[{i}]"
        if not isinstance(row, dict) or set(row) - KEYS or not {"name", "distcc"} <= set(row):
            raise FileError(f"{where}: keys must be name, distcc (required), jobs, label; got "
                            f"{', '.join(sorted(row)) if isinstance(row, dict) else type(row).__name__}", path=str(path))
        out.append(_host(row, where, str(path)))
    names = [h.name for h in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise FileError(f"{path}: host {dup!r} listed twice", path=str(path))
    return tuple(out)


def _host(row: dict[str, Any], where: str, path: str) -> BuildHost:
    addr, sep, port = str(row["distcc"]).rpartition(":")
    try:
        ipaddress.ip_address(addr)
        port_n = int(port)
        if not sep or not 1 <= port_n <= 65535:
            raise ValueError
    except ValueError:
        raise FileError(f"{where}.distcc: {row['distcc']!r} is not IP:PORT", path=path) from None
    jobs = row.get("jobs", 2)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= 256:
        raise FileError(f"{where}.jobs: {jobs!r} is not 1..256", path=path)
    name, label = row["name"], row.get("label", "")
    if not isinstance(name, str) or not name or not isinstance(label, str):
        raise FileError(f"{where}: name and label must be strings", path=path)
    return BuildHost(name, addr, port_n, jobs, label)


def distccd_label(policy: Any, host: BuildHost) -> str:
    """The TP label distccd runs under on `host`: the file's, else the one policy label entered by a distccd."""
    if host.label:
        if host.label not in policy.labels:
            raise PolicyError(f"{policy.source}: labels: no label {host.label!r} (build host {host.name})",
                              key="labels")
        return host.label
    found = [n for n, lab in policy.labels.items() if any(os.path.basename(e) == DISTCCD for e in lab.entrypoints)]
    if len(found) != 1:
        raise PolicyError(f"{policy.source}: labels: {len(found)} labels are entered by {DISTCCD}; name one as "
                          f"`label` for build host {host.name}", key="labels")
    return found[0]


def port_authority_refusal(policy: Any, host: BuildHost, label: str) -> str:
    """Why the policy does NOT let only distccd receive on `host`'s distcc port ("" when it does).

    The one place the build controller asks Port Authority's question. Today it reads the policy's
    PortRules (controlplane.core.policy) as parsed: a tcp listen rule for the port must exist, name
    `label`, and name only labels whose entrypoints are all distccd. The proof says the host runs this policy
    (its policy-load digest is the verifier's); whether the kernel enforces the rule is Port Authority's
    part (issue 24), to be asked here once it decides.
    """
    rules = [r for r in policy.port_authority.rules
             if r.port == host.port and r.protocol == "tcp" and getattr(r, "op", "listen") == "listen"]
    if not rules:
        return f"no Port Authority listen rule for {host.port}/tcp"
    for rule in rules:
        if label not in rule.labels:
            return f"Port Authority rule {host.port}/tcp does not name {label}"
        for other in rule.labels:
            entries = policy.labels[other].entrypoints if other in policy.labels else ()
            if not entries or any(os.path.basename(e) != DISTCCD for e in entries):
                return f"Port Authority rule {host.port}/tcp lets label {other} receive (not only {DISTCCD})"
    return ""
