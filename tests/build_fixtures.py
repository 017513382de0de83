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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pyroute2 import IPRoute, NetNS, netns

from controlplane.build.hosts import BuildHost
from controlplane.cli.enforce import Daemon
from controlplane.core.events import Event
from controlplane.core.policy import load_policy
from controlplane.verifier import registrar
from controlplane.verifier.judge import Reference
from controlplane.verifier.store import Store, default_url
from prima.measuredb import MeasureDB
from tests.attest_fixtures import running_host

DISTCC_PORT = 3632
TOOLCHAIN = ("distcc", "gcc-12", "binutils", "dash")
COMPILER = "x86_64-linux-gnu-gcc"    # the name distcc's client asks distccd for (it rewrites gcc)
TROJAN_C = """\
#include <unistd.h>
/* planted on a build host: runs in place of the compiler distccd asked for, then hands over to it */
/* argv[0] as a full path: gcc finds cc1 relative to where argv[0] says it is */
int main(int argc, char **argv) { (void)argc; argv[0] = "/usr/bin/%s"; execv(argv[0], argv); return 127; }
""" % COMPILER


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


def _free_index(ip: IPRoute) -> int:
    """The lowest 10.77.<index> whose veth name no other run (another test or benchmark) holds."""
    used = {link.get_attr("IFLA_IFNAME") for link in ip.get_links()}
    return next(i for i in range(100, 250) if f"cwb{i}h" not in used)


@contextlib.contextmanager
def veth_netns(name: str) -> Iterator[Netns]:
    """A fresh namespace `name` (with a unique suffix) and one veth pair 10.77.<i>.1/30 (here) <-> .2/30
    (inside), both up; <i> is one no concurrent run uses."""
    name = f"{name}-{os.getpid()}"
    netns.create(name)
    try:
        with IPRoute() as ip:
            index = _free_index(ip)
            host_if, ns_if = f"cwb{index}h", f"cwb{index}n"
            host_addr, ns_addr = f"10.77.{index}.1", f"10.77.{index}.2"
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
        """Put a compiler that no trusted source measured first on distccd's PATH: every later job execs it.

        It is a small ELF that execs the real driver (so the build still succeeds), compiled here. Not a
        `#!` script: the tracepoint backend judges a script's interpreter only (README, threat model)."""
        trojan = self.plant_dir / COMPILER
        src = self.plant_dir.parent / "trojan.c"
        src.write_text(TROJAN_C)
        subprocess.run(["/usr/bin/gcc", "-O2", "-o", str(trojan), str(src)], check=True, capture_output=True, timeout=120)
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
        _wait_group_gone(proc.pid)
        shutil.rmtree(plant, ignore_errors=True)


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Until no process of the group is left (distccd's children exit after their parent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


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


class Cluster:
    """Build hosts sharing one engine, and the verifier's files (its policy and DB copies are the hosts')."""

    def __init__(self, work: Path, policy: Path, db: Path) -> None:
        self.work, self.policy, self.db = work, policy, db
        self.verifier_dir = work / "verifier"
        self.verifier_dir.mkdir(parents=True, exist_ok=True)
        self.hosts: dict[str, object] = {}          # label -> tests.attest_fixtures.TestHost
        self.netns: dict[str, Netns] = {}
        self.entries: dict[str, Path] = {}
        self.distccd: dict[str, Distccd] = {}
        self._distccd_stacks: dict[str, contextlib.ExitStack] = {}
        self.build_hosts: list[BuildHost] = []
        self.daemon: Daemon | None = None
        self.failure: list[BaseException] = []

    def hosts_file(self) -> Path:
        path = self.work / "hosts.toml"
        path.write_text("".join(f'[[hosts]]\nname = "{h.name}"\ndistcc = "{h.distcc}"\njobs = {h.jobs}\n'
                                f'label = "{h.label}"\n\n' for h in self.build_hosts))
        return path

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        with Store.open(default_url(self.verifier_dir)) as store:
            yield store

    @contextlib.contextmanager
    def reference(self) -> Iterator[Reference]:
        with MeasureDB.open(self.db) as db:
            yield Reference(load_policy(self.policy), db)

    def start_distccd(self, label: str) -> Distccd:
        """(Re)start the distccd of `label`'s host: exec of its entrypoint, so it enters the label anew."""
        self.stop_distccd(label)
        stack = contextlib.ExitStack()
        self.distccd[label] = stack.enter_context(running_distccd(self.netns[label], self.entries[label], self.work))
        self._distccd_stacks[label] = stack
        return self.distccd[label]

    def stop_distccd(self, label: str) -> None:
        if label in self._distccd_stacks:
            self._distccd_stacks.pop(label).close()
            del self.distccd[label]


@contextlib.contextmanager
def build_cluster(work: Path, policy: Path, db: Path, hosts: list[tuple[str, str, Path]], *,
                  jobs: int = 2, interval_s: float = 1.0, engine_timeout: float = 300.0) -> Iterator[Cluster]:
    """For each (name, label, entrypoint): swtpm + log + HTTPS service, a netns with its distccd, enrolled
    in the verifier's store; one PRIMA engine (tracepoint) routing its events by label."""
    c = Cluster(work, policy, db)
    with MeasureDB.open(db) as mdb:
        db_digest = mdb.digest()
    with contextlib.ExitStack() as stack:
        for name, label, entry in hosts:
            c.hosts[label] = stack.enter_context(running_host(work / name, policy_path=policy, db_digest=db_digest))
            c.entries[label] = entry
        c.daemon = Daemon(policy, db, LabelRouter({label: h.log for label, h in c.hosts.items()}),
                          backend="tracepoint", log=stack.enter_context(open(os.devnull, "w")))
        thread = threading.Thread(target=_run_daemon, args=(c.daemon, c.failure), daemon=True)
        thread.start()
        stack.callback(thread.join, 30)
        stack.callback(setattr, c.daemon, "stop_requested", True)
        for h in c.hosts.values():
            h.state.on_quote = c.daemon.request_alive
        _wait_engine(c, engine_timeout)
        with c.store() as store:
            for name, label, _entry in hosts:
                c.netns[label] = stack.enter_context(veth_netns(f"cwlite-{name}"))
                stack.callback(c.stop_distccd, label)
                c.start_distccd(label)
                host = c.hosts[label]
                ca = host.data_dir / "swtpm" / "ca"
                registrar.enrol(host.url, name, store, cas=registrar.load_cas(sorted(ca.glob("*cert*.pem"))),
                                require_ek_cert=True, interval_s=interval_s)
                c.build_hosts.append(BuildHost(name, c.netns[label].ns_addr, DISTCC_PORT, jobs, label))
        yield c
        if c.failure:
            raise RuntimeError(f"the engine stopped: {c.failure[0]}") from c.failure[0]


def _run_daemon(daemon: Daemon, failure: list) -> None:
    try:
        daemon.run()
    except BaseException as exc:  # noqa: BLE001 - build_cluster reports it
        failure.append(exc)


def _wait_engine(c: Cluster, timeout: float) -> None:
    """Until the engine logged its DB load into every host's log (a bcc compile: a minute when loaded)."""
    deadline = time.monotonic() + timeout
    while not all(any(e.name.startswith("cwlite:db-load:") for e in h.log.entries(0)) for h in c.hosts.values()):
        if c.failure:
            raise RuntimeError(f"the engine stopped: {c.failure[0]}") from c.failure[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine did not start within {timeout:.0f} s")
        time.sleep(0.2)
