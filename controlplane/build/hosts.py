"""The build hosts file, and the Port Authority condition a build host must meet.

    # build-hosts.toml: one table per host, by the name it was enrolled under
    [[hosts]]
    name = "build1"             # `cwlite enrol URL build1`
    distcc = "10.0.0.2:3632"    # where its distccd listens
    jobs = 2                    # distcc's /LIMIT for it
    label = "tp_build"          # the TP label distccd runs under (default: the policy's label entered by distccd)

    # a Build VM (`cwlite vm up vm1` on host1): never enrolled, verified through the host that booted it
    [[hosts]]
    name = "vm1"
    distcc = "127.0.0.1:40123"  # the port host1 forwards to the VM's distccd (`cwlite vm list --json`)
    [hosts.vm]
    via = "host1"               # the enrolled host that booted it (`cwlite verify vm1 --via host1`)
    kernel = "vmlinuz"          # the kernel image it must have booted (relative paths: to this file)
    initrd = "initrd.img"       # optional: the initrd it must have booted (default: none)
    cmdline = "lsm=... -- ..."  # the boot command line it must have had (`cwlite vm list --json`)
    disk = "vm.img"             # optional: the root disk image it must have booted (`vm up --disk`; default: none)
    host_policy = "host.toml"   # the verifier's copies of host1's policy and measurement DB
    host_db = "host.db"
    distccd_port = 3632         # optional: the port distccd listens on inside the VM (its Port Authority rule's)

Every error names the file, the line and the key: `hosts.toml:7: hosts[1].vm.kernel: no such file`.
"""
from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.core.errors import FileError, PolicyError, VmError
from controlplane.core.policy import key_lines
from controlplane.core.digest import sha256_file
from controlplane.core.vmrecord import NO_PART, check_vm_name, cmdline_digest
from portauthority import rules as pa_rules

DEFAULT_HOSTS = Path("/etc/cwlite/build-hosts.toml")
DISTCCD = "distccd"
DISTCCD_PORT = 3632              # distccd's own default (distccd(1)), and the port a Build VM's distccd listens on
KEYS = {"name": True, "distcc": True, "jobs": False, "label": False, "vm": False}
VM_KEYS = {"via": True, "kernel": True, "initrd": False, "cmdline": True, "host_policy": True, "host_db": True,
           "distccd_port": False, "disk": False}


@dataclass(frozen=True)
class VmLink:
    """A Build VM's chain: the enrolled host that booted it, the boot parts it must have, that host's references."""

    via: str
    kernel: Path
    cmdline: str
    host_policy: Path
    host_db: Path
    initrd: Path | None = None
    distccd_port: int = DISTCCD_PORT
    disk: Path | None = None

    def boot(self) -> dict[str, bytes]:
        """The verifier's digests of the boot parts (controlplane.verifier.chain.attest_via's `boot`)."""
        parts = {"kernel": sha256_file(self.kernel), "initrd": sha256_file(self.initrd) if self.initrd else NO_PART,
                 "cmdline": cmdline_digest(self.cmdline)}
        return parts | ({"disk": sha256_file(self.disk)} if self.disk else {})


@dataclass(frozen=True)
class BuildHost:
    """One distcc host: its enrolled (or VM) name, distccd's address and port, its job limit, its TP label,
    and for a Build VM the host chain it is verified through."""

    name: str
    address: str
    port: int
    jobs: int = 2
    label: str = ""
    vm: VmLink | None = None

    @property
    def distcc(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def spec(self) -> str:
        """The distcc host specification (distcc(1)): ADDR:PORT/LIMIT."""
        return f"{self.distcc}/{self.jobs}"

    @property
    def distccd_port(self) -> int:
        """The port distccd listens on where it runs (a VM's is behind its host's forwarded port)."""
        return self.vm.distccd_port if self.vm else self.port


class _Where:
    """`file:line: hosts[i].key` for every message (tomllib gives no positions: core.policy.key_lines does)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.lines = path, key_lines(text)

    def fail(self, keys: tuple, what: str) -> FileError:
        probe = keys
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = f":{self.lines[probe]}" if probe else ""
        name = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")
        return FileError(f"{self.path}{line}: {name}: {what}", path=str(self.path))

    def table(self, keys: tuple, row: Any, allowed: dict[str, bool]) -> dict:
        if not isinstance(row, dict):
            raise self.fail(keys, f"expected a table, got {type(row).__name__}")
        for k in row:
            if k not in allowed:
                raise self.fail((*keys, k), f"unknown key (allowed: {', '.join(allowed)})")
        for k, required in allowed.items():
            if required and k not in row:
                raise self.fail((*keys, k), "required key missing")
        return row

    def string(self, keys: tuple, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(keys, f"expected a non-empty string, got {value!r}")
        return value

    def file(self, keys: tuple, value: Any) -> Path:
        path = Path(self.string(keys, value))
        path = path if path.is_absolute() else self.path.parent / path
        if not path.is_file():
            raise self.fail(keys, f"{path}: no such file")
        return path

    def port(self, keys: tuple, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise self.fail(keys, f"{value!r} is not a port (1..65535)")
        return value


def load_hosts(path: Path) -> tuple[BuildHost, ...]:
    """Parse the hosts file; FileError naming `file:line: hosts[i].key` for anything wrong."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except OSError as exc:
        raise FileError.from_os(path, exc, "read the build hosts file") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FileError(f"{path}: not TOML: {exc}", path=str(path)) from exc
    where = _Where(path, text)
    rows = data.get("hosts")
    if set(data) != {"hosts"} or not isinstance(rows, list) or not rows:
        raise FileError(f"{path}: expected one or more [[hosts]] tables and nothing else", path=str(path))
    out = tuple(_host(where, i, row) for i, row in enumerate(rows))
    for i, host in enumerate(out):
        if any(h.name == host.name for h in out[:i]):
            raise where.fail(("hosts", i, "name"), f"host {host.name!r} listed twice")
        other = next((h for h in out[:i] if host.vm and h.vm and h.vm.via == host.vm.via), None)
        if other and (other.vm.host_policy, other.vm.host_db) != (host.vm.host_policy, host.vm.host_db):
            raise where.fail(("hosts", i, "vm"), f"host {host.vm.via}'s host_policy/host_db differ from those "
                             f"{other.name} gives for it")
    return out


def _host(where: _Where, i: int, row: Any) -> BuildHost:
    at = ("hosts", i)
    where.table(at, row, KEYS)
    addr, sep, port = str(row["distcc"]).rpartition(":")
    try:
        ipaddress.ip_address(addr)
        port_n = int(port)
        if not sep or not 1 <= port_n <= 65535:
            raise ValueError
    except ValueError:
        raise where.fail((*at, "distcc"), f"{row['distcc']!r} is not IP:PORT") from None
    jobs = row.get("jobs", 2)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= 256:
        raise where.fail((*at, "jobs"), f"{jobs!r} is not 1..256")
    name = where.string((*at, "name"), row["name"])
    label = where.string((*at, "label"), row["label"]) if "label" in row else ""
    vm = _vm(where, (*at, "vm"), row["vm"], name) if "vm" in row else None
    return BuildHost(name, addr, port_n, jobs, label, vm)


def _vm(where: _Where, at: tuple, row: Any, name: str) -> VmLink:
    where.table(at, row, VM_KEYS)
    try:
        check_vm_name(name)
    except VmError as exc:
        raise where.fail((*at[:-1], "name"), f"not a VM name: {exc}") from None
    via = where.string((*at, "via"), row["via"])
    if via == name:
        raise where.fail((*at, "via"), f"a VM is verified through another host, not itself ({via!r})")
    return VmLink(via=via, kernel=where.file((*at, "kernel"), row["kernel"]),
                  cmdline=where.string((*at, "cmdline"), row["cmdline"]),
                  host_policy=where.file((*at, "host_policy"), row["host_policy"]),
                  host_db=where.file((*at, "host_db"), row["host_db"]),
                  initrd=where.file((*at, "initrd"), row["initrd"]) if "initrd" in row else None,
                  disk=where.file((*at, "disk"), row["disk"]) if "disk" in row else None,
                  distccd_port=where.port((*at, "distccd_port"), row.get("distccd_port", DISTCCD_PORT)))


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
    """Why the policy does NOT let only distccd receive on `host`'s distccd port ("" when it does).

    Asked of Port Authority's own decision (portauthority.rules, the statement of ebpf/pa_decide.h): `label`
    may listen there by a listen rule, and every label a listen rule lets receive there is entered only
    through distccd. The proof says the host runs this policy (its policy-load digest is the verifier's).
    """
    port = host.distccd_port
    decision = pa_rules.decide(policy, label, "listen", "tcp", port)
    if decision.rule is None or decision.rule.op != "listen":
        return f"no Port Authority listen rule for {port}/tcp lets {label} receive ({decision.describe()})"
    if not decision.allowed:
        return f"Port Authority does not let {label} listen on {port}/tcp: {decision.describe()}"
    for other in pa_rules.receivers(policy, "tcp", port):
        entries = policy.labels[other].entrypoints if other in policy.labels else ()
        if not entries or any(os.path.basename(e) != DISTCCD for e in entries):
            return f"Port Authority rule {port}/tcp lets label {other} receive (not only {DISTCCD})"
    return ""
