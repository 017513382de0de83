"""Build hosts on this machine: distccd under a TP label in its own network namespace, with its own
attestation service, swtpm and measurement log.

Two such hosts share one kernel and one PRIMA engine (a real Build VM has its own). The engine's
events reach each host's log by label: each host's distccd enters its own label (host a through
/usr/bin/distccd, host b through a copy of it), so what a host's processes did is in that host's log
only; events with no label (daemon start, policy and DB loads, liveness) go to every host's log, and so
does an event under a label no host owns (fail closed).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pyroute2 import IPRoute, NetNS, netns

from controlplane.core.events import Event

DISTCC_PORT = 3632
TOOLCHAIN = ("distcc", "gcc-12", "binutils", "dash")
TROJAN = """#!/bin/sh
# planted on a build host: runs instead of the compiler distccd asked for, then hands over to it
exec /usr/bin/x86_64-linux-gnu-gcc "$@"
"""


class LabelRouter:
    """An EventSink for one engine shared by several hosts: each event to the log of the host owning its label."""

    def __init__(self, routes: dict[str, object]) -> None:
        self.routes = routes

    def record(self, event: Event) -> None:
        logs = [self.routes[event.label]] if event.label in self.routes else list(self.routes.values())
        for log in logs:
            log.record(event)


@dataclass
class Netns:
    """A network namespace joined to this one by a veth pair: `host_addr` here, `ns_addr` inside."""

    name: str
    host_if: str
    host_addr: str
    ns_addr: str


@contextlib.contextmanager
def veth_netns(name: str, index: int) -> Iterator[Netns]:
    """A fresh namespace `name` with one veth pair 10.77.<index>.1/30 (here) <-> .2/30 (inside), both up."""
    host_if, ns_if = f"cwb{index}h", f"cwb{index}n"
    host_addr, ns_addr = f"10.77.{index}.1", f"10.77.{index}.2"
    with contextlib.suppress(OSError, FileNotFoundError):
        netns.remove(name)
    netns.create(name)
    try:
        with IPRoute() as ip:
            for old in ip.link_lookup(ifname=host_if):
                ip.link("del", index=old)
            ip.link("add", ifname=host_if, kind="veth", peer=ns_if)
            ip.link("set", index=ip.link_lookup(ifname=ns_if)[0], net_ns_fd=name)
            hidx = ip.link_lookup(ifname=host_if)[0]
            ip.addr("add", index=hidx, address=host_addr, prefixlen=30)
            ip.link("set", index=hidx, state="up")
        with NetNS(name) as ns:
            idx = ns.link_lookup(ifname=ns_if)[0]
            ns.addr("add", index=idx, address=ns_addr, prefixlen=30)
            ns.link("set", index=idx, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield Netns(name, host_if, host_addr, ns_addr)
    finally:
        netns.remove(name)      # the veth pair goes with it


@dataclass
class Distccd:
    """A running distccd: where it listens, and the directory at the head of its PATH (empty until planted)."""

    proc: subprocess.Popen
    address: str
    port: int
    plant_dir: Path
    stderr: Path

    def plant(self) -> Path:
        """Put an untrusted `x86_64-linux-gnu-gcc` first on distccd's PATH: every later job execs it."""
        trojan = self.plant_dir / "x86_64-linux-gnu-gcc"
        trojan.write_text(TROJAN)
        trojan.chmod(0o755)
        return trojan


@contextlib.contextmanager
def running_distccd(ns: Netns, entry: Path, work: Path) -> Iterator[Distccd]:
    """distccd (exec of `entry`: the TP label's entrypoint) inside `ns`, accepting only `ns.host_addr`."""
    plant = Path(tempfile.mkdtemp(prefix="cwlite-plant-", dir=work))
    plant.chmod(0o755)             # distccd's jobs run as nobody
    err = work / f"distccd-{ns.name}.err"
    env = {"PATH": f"{plant}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C"}
    with open(err, "wb") as f:
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, str(entry), "--daemon", "--no-detach",
                                 "--listen", ns.ns_addr, "--port", str(DISTCC_PORT), "--allow", ns.host_addr,
                                 "--user", "nobody", "--jobs", "2", "--log-stderr", "--log-level", "warning"],
                                env=env, stdout=f, stderr=f, start_new_session=True)
    try:
        wait_listening(ns.ns_addr, DISTCC_PORT, proc, err)
        yield Distccd(proc, ns.ns_addr, DISTCC_PORT, plant, err)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(plant, ignore_errors=True)


def wait_listening(addr: str, port: int, proc: subprocess.Popen, err: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"distccd exited {proc.returncode}: {err.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((addr, port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"distccd not listening on {addr}:{port} after {timeout:.0f} s")
        time.sleep(0.2)


def c_project(root: Path, *, files: int = 12, slow_step_s: int = 0) -> Path:
    """A small real C project (a Makefile, `files` modules and a main); `slow_step_s` adds a local step
    that runs beside the compiles (so a build lasts long enough to be stopped midway)."""
    root.mkdir(parents=True, exist_ok=True)
    mods = [f"mod{i:02d}" for i in range(files)]
    for i, m in enumerate(mods):
        body = "\n".join(f"static unsigned f{j}(unsigned x) {{ for (int k = 0; k < {64 + j}; k++) x = x * {2 * j + 3}u + "
                         f"(x >> {j % 7 + 1}); return x; }}" for j in range(40))
        calls = " + ".join(f"f{j}(x)" for j in range(40))
        (root / f"{m}.c").write_text(f"{body}\nunsigned {m}(unsigned x) {{ return {calls} + {i}u; }}\n")
    decls = "\n".join(f"unsigned {m}(unsigned);" for m in mods)
    total = " + ".join(f"{m}(1)" for m in mods)
    (root / "main.c").write_text(f"#include <stdio.h>\n{decls}\nint main(void) {{ printf(\"%u\\n\", {total}); return 0; }}\n")
    objs = " ".join(f"{m}.o" for m in [*mods, "main"])
    slow = f"slow.stamp:\n\tsleep {slow_step_s} && touch slow.stamp\n" if slow_step_s else ""
    deps = " slow.stamp" if slow_step_s else ""
    (root / "Makefile").write_text(
        f"OBJS = {objs}\nCFLAGS = -O2\n\nprog: $(OBJS){deps}\n\tgcc -o prog $(OBJS)\n\n"
        f"%.o: %.c\n\tgcc $(CFLAGS) -c $< -o $@\n\n{slow}")
    return root
