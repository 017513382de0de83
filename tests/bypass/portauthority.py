"""Port Authority scenarios, written once for a backend (tests/kernel runs them on the tracepoint backend,
tests/vm/guest/test_pa_lsm.py on the lsm one).

Real traffic only: the loopback, and one network namespace joined to the host by a veth pair
the lab makes with pyroute2 (10.213.N.0/29: host .1, the allowed peer .2, an outside peer .3).
Only processes that entered the lab's own labels (copies of /bin/sh as entrypoints) are
mediated; the tc classifier sits on the lab's veth only. A TP runs `nethelper` (C, trusted for
its label) to bind, listen, accept and receive; peers are unlabelled Python in the namespace.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import select
import socket
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS, config, netns

from cext import bpfmap
from controlplane.core.events import Event, EventKind, parse_pa_subject
from controlplane.core.policy import Policy, parse_policy
from portauthority import rules
from portauthority.engine import Engine as PaEngine
from prima import selfprotect
from prima.engine import Engine
from tests.bypass.lab import LDSO, shared_libs
from tests.prima_fixtures import measure_files

# pyroute2 makes namespaces and their sockets in a child process it gives 2 s to answer (10 s in all
# for a socket): under the VM tier's software emulation that child takes longer (seen: netns.create
# timed out in the guest).
config.default_communicate_timeout = 60
config.default_create_socket_timeout = 120

NETHELPER_C = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
/* listen ADDR PORT N: bind (tcp), listen, print the port, serve N connections ("ok\n" to each)
   listen-any N: listen without bind (the kernel picks a port), print it, serve N
   echo ADDR PORT: bind (tcp), listen, print the port, accept one connection and answer each read
   with "ok\n" until EOF, then print the number of reads
   udp-recv PORT SECONDS: bind udp, print the number of datagrams received in SECONDS */
static int serve(int s, int n)
{
	struct sockaddr_in a; socklen_t len = sizeof a;
	if (getsockname(s, (struct sockaddr *)&a, &len)) { perror("getsockname"); return 3; }
	printf("listening %d\n", ntohs(a.sin_port)); fflush(stdout);
	for (int i = 0; i < n; i++) {
		struct pollfd p = {.fd = s, .events = POLLIN};
		if (poll(&p, 1, 60000) != 1) { printf("no connection\n"); return 4; }
		int c = accept(s, (struct sockaddr *)&a, &len);
		if (c < 0) { perror("accept"); return 3; }
		char buf[64]; ssize_t r = read(c, buf, sizeof buf);
		if (r > 0 && write(c, "ok\n", 3) != 3) return 3;
		printf("accepted %s\n", inet_ntoa(a.sin_addr)); fflush(stdout);
		close(c);
	}
	return 0;
}
int main(int argc, char **argv)
{
	if (argc < 2) return 2;
	if (!strcmp(argv[1], "listen") && argc == 5) {
		int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
		inet_pton(AF_INET, argv[2], &a.sin_addr);
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (bind(s, (struct sockaddr *)&a, sizeof a)) { perror("bind"); return 3; }
		if (listen(s, 16)) { perror("listen"); return 3; }
		return serve(s, atoi(argv[4]));
	}
	if (!strcmp(argv[1], "echo") && argc == 4) {
		int s = socket(AF_INET, SOCK_STREAM, 0), one = 1, n = 0;
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
		inet_pton(AF_INET, argv[2], &a.sin_addr);
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) { perror("bind/listen"); return 3; }
		printf("listening %s\n", argv[3]); fflush(stdout);
		int c = accept(s, 0, 0);
		char buf[64];
		while (read(c, buf, sizeof buf) > 0 && write(c, "ok\n", 3) == 3) n++;
		printf("reads %d\n", n);
		return 0;
	}
	if (!strcmp(argv[1], "listen-any") && argc == 3) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (listen(s, 16)) { perror("listen"); return 3; }
		return serve(s, atoi(argv[2]));
	}
	if (!strcmp(argv[1], "udp-recv") && argc == 4) {
		int s = socket(AF_INET, SOCK_DGRAM, 0), n = 0;
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
		if (bind(s, (struct sockaddr *)&a, sizeof a)) { perror("bind"); return 3; }
		printf("listening %s\n", argv[2]); fflush(stdout);
		struct pollfd p = {.fd = s, .events = POLLIN};
		while (poll(&p, 1, atoi(argv[3]) * 1000) == 1) { char b[2048]; if (recv(s, b, sizeof b, 0) > 0) n++; }
		printf("received %d\n", n);
		return 0;
	}
	return 2;
}
"""

# A peer: unlabelled Python in the lab's namespace (argv: netns, source address, then the job).
PEER_PY = r"""
import socket, sys
from pyroute2 import netns
netns.setns(sys.argv[1])
src, job = sys.argv[2], sys.argv[3]
if job == "connect":
    dst, port = sys.argv[4], int(sys.argv[5])
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(float(sys.argv[6]))
    try:
        s.connect((dst, port))
        s.sendall(b"hi\n")
        print(s.recv(16).decode().strip() or "closed")
    except OSError as exc:
        print(f"failed {type(exc).__name__}")
elif job == "exec":                  # a program of the test's, inside the namespace
    import os
    os.execv(sys.argv[4], sys.argv[4:])
elif job == "flood":
    dst, port, n = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    for i in range(n):
        s.sendto(b"x" * 32, (dst, port))
    print("sent", n)
"""


class PaLab:
    """One PRIMA engine and one Port Authority engine on `backend`, a namespace joined by a veth pair,
    and three labels: tp_srv (rules below), tp_out (a connect rule), tp_none (no rule)."""

    def __init__(self, root: Path, *, backend: str, extra_trusted: tuple[str, ...] | list[str] = ()) -> None:
        self.root = root
        self.port = 36000 + os.getpid() % 1000       # tcp and udp: tp_srv's
        self.other = self.port + 1                    # no rule names it
        n = os.getpid() % 250
        self.host_ip, self.peer_ip, self.outside_ip = f"10.213.{n}.1", f"10.213.{n}.2", f"10.213.{n}.3"
        self.ns = f"cwlpa{os.getpid()}"
        self.host_if, self.ns_if = f"cwlpa{os.getpid()}h"[:15], f"cwlpa{os.getpid()}n"[:15]
        self.nethelper = str(root / "nethelper")
        (root / "nethelper.c").write_text(NETHELPER_C)
        subprocess.run(["gcc", "-O2", "-o", self.nethelper, str(root / "nethelper.c")], check=True)
        self.entry = {}
        for label in ("tp_srv", "tp_out", "tp_none"):
            self.entry[label] = str(root / f"ep-{label}")
            shutil.copy2("/bin/sh", self.entry[label])
        self.policy = self._policy()
        base = sorted({os.path.realpath("/bin/sh"), os.path.realpath(LDSO), self.nethelper, *extra_trusted,
                       *shared_libs("/bin/sh"), *shared_libs(self.nethelper)})
        self._netns_up()
        self.events: list[Event] = []
        self.prima = Engine(self.policy, measure_files([*base, *self.entry.values()], 1), backend=backend)
        try:
            assert self.prima.loaded is not None
            self.pa = PaEngine(self.policy, self.prima.loaded.labels, labels_fd=self.prima.label_map_fd, backend=backend,
                               interfaces=[self.host_if], interval_s=0.2)
            selfprotect.register(self.pa.bpf, into=self.prima.bpf)
        except BaseException:
            self.prima.close()
            self._netns_down()
            raise

    def _policy(self) -> Policy:
        labels = "".join(f'[labels.{lb}]\nentrypoints = ["{ep}"]\ntrust_set = "lab"\n' for lb, ep in self.entry.items())
        text = f'''mode = "enforce"
trust_sets = ["lab"]
{labels}
[[port_authority.rules]]
port = {self.port}
labels = ["tp_srv"]
peers = ["{self.peer_ip}/32", "127.0.0.0/8"]

[[port_authority.rules]]
port = {self.port}
protocol = "udp"
labels = ["tp_srv"]
peers = ["{self.peer_ip}/32"]

[[port_authority.rules]]
port = {self.port}
op = "connect"
labels = ["tp_out"]
peers = ["127.0.0.0/8"]
'''
        return parse_policy(text, source=str(self.root / "pa-policy.toml"))

    def _netns_up(self) -> None:
        netns.create(self.ns)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.host_if, kind="veth", peer={"ifname": self.ns_if, "net_ns_fd": self.ns})
            idx = ipr.link_lookup(ifname=self.host_if)[0]
            ipr.addr("add", index=idx, address=self.host_ip, prefixlen=29)
            ipr.link("set", index=idx, state="up")
        with NetNS(self.ns) as ns:
            idx = ns.link_lookup(ifname=self.ns_if)[0]
            for ip in (self.peer_ip, self.outside_ip):
                ns.addr("add", index=idx, address=ip, prefixlen=29)
            ns.link("set", index=idx, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")

    def _netns_down(self) -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.host_if)
            if found:
                ipr.link("del", index=found[0])
        netns.remove(self.ns)

    # ---- processes ---------------------------------------------------------------------
    def tp(self, label: str, *args: str) -> subprocess.Popen:
        """`nethelper ARGS` in a process that entered `label` (exec of its entrypoint, which execs the helper)."""
        cmd = " ".join([self.nethelper, *args])
        return subprocess.Popen([self.entry[label], "-c", f"exec {cmd}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def tp_run(self, label: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
        p = self.tp(label, *args)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    @staticmethod
    def first_line(p: subprocess.Popen, timeout: float = 10) -> str:
        """The first line a running helper prints ("listening PORT"), or "" when it exits first."""
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        return p.stdout.readline().strip() if ready else ""

    def peer(self, src: str, *job: str, timeout: float = 60) -> str:
        """Run an unlabelled peer job in the namespace from source address `src`: its output."""
        out = subprocess.run([sys.executable, "-c", PEER_PY, self.ns, src, *job], capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def collect(self, timeout_ms: int = 50, *, flush: bool = True) -> list[Event]:
        self.events += self.prima.poll(timeout_ms)
        self.events += self.pa.poll(timeout_ms, flush=flush)
        return self.events

    def refused(self, **want: object) -> list[Event]:
        """pa-refused entries so far whose label/op and subject fields match `want`."""
        out = []
        for e in self.collect():
            s = parse_pa_subject(e.subject) if e.kind is EventKind.PA_REFUSED else None
            if s is None:
                continue
            fields = {"label": e.label, "op": e.op, "protocol": s.protocol, "port": s.port, "why": s.why,
                      "action": s.action, "rule": s.rule}
            if all(fields[k] == v for k, v in want.items()):
                out.append(e)
        return out

    def close(self) -> None:
        try:
            self.pa.close()
        finally:
            self.prima.close()
            self._netns_down()


class PaScenarios:
    """Each scenario attacks one promise of Port Authority with real traffic; `backend` is the
    class's tests.bypass.backend.Backend."""

    @pytest.fixture(scope="class")
    @classmethod
    def pa_lab(cls, tmp_path_factory: pytest.TempPathFactory):
        lab = PaLab(tmp_path_factory.mktemp(f"pa-{cls.backend.name}"), backend=cls.backend.name)
        yield lab
        lab.close()

    def test_tp_accepts_an_allowed_peer_and_its_listener_is_logged(self, pa_lab: PaLab) -> None:
        srv = pa_lab.tp("tp_srv", "listen", pa_lab.host_ip, str(pa_lab.port), "1")
        assert pa_lab.first_line(srv) == f"listening {pa_lab.port}"
        pa_lab.collect()  # the daemon reads its events while the listener runs (it measures /proc/PID/exe)
        # 30 s: under the VM tier's software emulation a loaded guest takes seconds to schedule the server
        answer = pa_lab.peer(pa_lab.peer_ip, "connect", pa_lab.host_ip, str(pa_lab.port), "30")
        out, err = srv.communicate(timeout=30)
        assert answer == "ok", (answer, out, err, pa_lab.pa.counts())
        assert srv.returncode == 0 and f"accepted {pa_lab.peer_ip}" in out, (out, err)
        listeners = [e for e in pa_lab.collect() if e.kind is EventKind.PA_LISTENER and e.label == "tp_srv"]
        assert len(listeners) == 1
        subject = parse_pa_subject(listeners[0].subject)
        assert subject is not None and (subject.protocol, subject.port, subject.rule) == ("tcp", pa_lab.port, 1)
        assert subject.exe == pa_lab.nethelper
        assert listeners[0].digest == hashlib.sha256(Path(pa_lab.nethelper).read_bytes()).digest()
        assert rules.decide(pa_lab.policy, "tp_srv", "accept", "tcp", pa_lab.port, peer=pa_lab.peer_ip).allowed

    def test_the_same_tp_cannot_listen_on_another_port(self, pa_lab: PaLab) -> None:
        r = pa_lab.tp_run("tp_srv", "listen", "0.0.0.0", str(pa_lab.other), "0")
        assert r.returncode == 3 and "bind: Operation not permitted" in r.stderr, r
        [entry] = pa_lab.refused(label="tp_srv", op="bind", port=pa_lab.other)
        s = parse_pa_subject(entry.subject)
        assert s is not None and (s.why, s.action, s.count, s.rule) == ("no-rule", "denied", 1, 0)
        assert not rules.decide(pa_lab.policy, "tp_srv", "bind", "tcp", pa_lab.other).allowed

    def test_an_allowed_port_refuses_a_peer_outside_the_rule(self, pa_lab: PaLab) -> None:
        srv = pa_lab.tp("tp_srv", "listen", pa_lab.host_ip, str(pa_lab.port), "1")
        assert pa_lab.first_line(srv) == f"listening {pa_lab.port}"
        assert pa_lab.peer(pa_lab.outside_ip, "connect", pa_lab.host_ip, str(pa_lab.port), "2").startswith("failed")
        srv.kill()
        srv.wait()
        # tc drops the SYNs on the veth before any socket sees them: counted per key, as packets
        dropped = pa_lab.refused(op="packet", port=pa_lab.port, why="peer", action="denied")
        assert dropped and sum(parse_pa_subject(e.subject).count for e in dropped) >= 1
        decision = rules.decide(pa_lab.policy, "tp_srv", "accept", "tcp", pa_lab.port, peer=pa_lab.outside_ip)
        assert not decision.allowed and decision.why == "peer" and decision.index == 0

    def test_a_tp_with_no_rule_receives_nothing(self, pa_lab: PaLab) -> None:
        # no bind, no connect: EPERM
        r = pa_lab.tp_run("tp_none", "udp-recv", str(pa_lab.other), "1")
        assert r.returncode == 3 and "bind: Operation not permitted" in r.stderr, r
        srv = pa_lab.tp("tp_none", "listen-any", "1")
        if self.backend.pa_judges_listen:
            # lsm: the listen itself is refused (no rule names the port, which is 0 before the kernel picks one)
            out, err = srv.communicate(timeout=15)
            assert srv.returncode == 3 and "listen: Operation not permitted" in err, (out, err)
            [entry] = pa_lab.refused(label="tp_none", op="listen", protocol="tcp", port=0)
            s = parse_pa_subject(entry.subject)
            assert s is not None and (s.why, s.action, s.count) == ("no-rule", "denied", 1)
            return
        # tracepoint: a listen without bind gets a port from the kernel (no bind hook runs): nothing reaches it
        line = pa_lab.first_line(srv)
        assert line.startswith("listening "), line
        port = int(line.split()[1])
        client = subprocess.run([sys.executable, "-c", "import socket,sys\ns=socket.socket();s.settimeout(2)\n"
                                 "try:\n s.connect(('127.0.0.1',int(sys.argv[1])));print('connected')\n"
                                 "except OSError as e: print('failed')", str(port)], capture_output=True, text=True)
        assert client.stdout.strip() == "failed"
        srv.kill()
        out, _ = srv.communicate(timeout=15)
        assert "accepted" not in out
        assert pa_lab.refused(label="tp_none", op="receive", port=port, why="no-rule", action="denied")

    def test_an_unlabelled_process_is_unaffected(self, pa_lab: PaLab) -> None:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((pa_lab.host_ip, pa_lab.other))   # a port no rule opens: the TP may not, we may
            s.listen(1)
            s.settimeout(10)
            peer = subprocess.Popen([sys.executable, "-c", PEER_PY, pa_lab.ns, pa_lab.outside_ip, "connect",
                                     pa_lab.host_ip, str(pa_lab.other), "5"], stdout=subprocess.PIPE, text=True)
            conn, addr = s.accept()
            with conn:
                conn.recv(16)
                conn.sendall(b"ok\n")
            assert peer.communicate(timeout=10)[0].strip() == "ok" and addr[0] == pa_lab.outside_ip
        assert rules.decide(pa_lab.policy, "", "accept", "tcp", pa_lab.other, peer=pa_lab.outside_ip).why == "unlabelled"

    def test_an_established_connection_loses_its_allowance_with_the_rule(self, pa_lab: PaLab) -> None:
        """A connected socket's input is decided once per rule generation (cgroup_skb remembers it in
        the socket's storage): a reload that drops the rule stops the next segment of an open connection."""
        srv = pa_lab.tp("tp_srv", "echo", "127.0.0.1", str(pa_lab.port))
        assert pa_lab.first_line(srv) == f"listening {pa_lab.port}"
        labels = pa_lab.prima.label_ids(pa_lab.policy)
        pa = pa_lab.policy.port_authority
        without = dataclasses.replace(pa_lab.policy, port_authority=dataclasses.replace(
            pa, rules=tuple(r for r in pa.rules if not (r.protocol == "tcp" and r.op == "listen"))))
        try:
            with socket.create_connection(("127.0.0.1", pa_lab.port), timeout=10) as c:
                for _ in range(3):   # allowed: the first segments decide, the later ones are remembered
                    c.sendall(b"a")
                    assert c.recv(16) == b"ok\n"
                pa_lab.pa.reload(without, labels)
                c.sendall(b"b")
                c.settimeout(2)
                with pytest.raises(socket.timeout):
                    c.recv(16)                       # the segment (and its retransmits) never reach the TP
                assert pa_lab.refused(label="tp_srv", op="receive", port=pa_lab.port, why="no-rule", action="denied")
                pa_lab.pa.reload(pa_lab.policy, labels)
                c.settimeout(30)
                assert c.recv(16) == b"ok\n"      # the rule back: the retransmitted segment is let in
        finally:
            pa_lab.pa.reload(pa_lab.policy, labels)
            srv.kill()
            srv.wait()

    def test_a_denied_flood_is_a_few_entries_whose_counts_add_up(self, pa_lab: PaLab) -> None:
        pa_lab.collect()
        before = len(pa_lab.events)
        n = 100_000
        assert pa_lab.peer(pa_lab.outside_ip, "flood", pa_lab.host_ip, str(pa_lab.port), str(n), timeout=300) == f"sent {n}"
        time.sleep(0.5)
        pa_lab.collect()
        key = ("", "packet", "udp", pa_lab.port, "peer", "denied")
        total = pa_lab.pa.counts()[key]
        entries = [e for e in pa_lab.events[before:] if e.kind is EventKind.PA_REFUSED and e.op == "packet"
                   and parse_pa_subject(e.subject).protocol == "udp"]
        logged = sum(parse_pa_subject(e.subject).count for e in entries)
        # every packet that reached the veth was dropped and counted; the log holds all of them in a
        # few entries (one per interval), never one per packet
        assert logged == total
        assert total >= n * 0.9, f"only {total} of {n} packets reached the classifier"
        assert 1 <= len(entries) <= 50, len(entries)

    def test_a_tps_socket_receives_only_from_its_rules_peers(self, pa_lab: PaLab) -> None:
        """The per-packet check of a labelled socket (lsm socket_sock_rcv_skb, tracepoint cgroup_skb) on the
        loopback, where no tc classifier runs: tp_srv's UDP rule admits only the namespace's peer."""
        import socket

        # 20 s of quiet ends the count: the peer's Python takes seconds to start under the VM's emulation
        srv = pa_lab.tp("tp_srv", "udp-recv", str(pa_lab.port), "20")
        assert pa_lab.first_line(srv) == f"listening {pa_lab.port}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(5):
                s.sendto(b"from-loopback", ("127.0.0.1", pa_lab.port))
        assert pa_lab.peer(pa_lab.peer_ip, "flood", pa_lab.host_ip, str(pa_lab.port), "3") == "sent 3"
        out, _ = srv.communicate(timeout=60)
        assert srv.returncode == 0 and out.split()[-2:] == ["received", "3"], out
        dropped = pa_lab.refused(label="tp_srv", op="receive", protocol="udp", port=pa_lab.port, why="peer",
                                 action="denied")
        assert sum(parse_pa_subject(e.subject).count for e in dropped) == 5
        assert {parse_pa_subject(e.subject).rule for e in dropped} == {2}
        assert not rules.decide(pa_lab.policy, "tp_srv", "receive", "udp", pa_lab.port, peer="127.0.0.1").allowed


def scenario_engines_reopened_decide_on_live_labels(root: Path, backend: str, rounds: int = 3) -> None:
    """Engines opened and closed one after another in ONE process (a daemon restarted in place, a
    test session): each round's Port Authority reads that round's PRIMA label map (the kernel's map
    ids agree) and decides on the labels it holds: a TP's bind to a port no rule opens is refused
    under its label, its allowed listener is logged under its label. Each round starts with more
    descriptors open, as in any long-lived process, so a map found by a remembered fd NUMBER (bcc's
    "extern" table) would be another object: seen, the bind was allowed (judged unlabelled)."""
    held: list[int] = []
    try:
        for i in range(rounds):
            held += [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
            (root / f"round{i}").mkdir()
            lab = PaLab(root / f"round{i}", backend=backend)
            try:
                src = lab.pa.bpf[b"cwl_pa_label_src"].map_fd
                inner = int.from_bytes(bpfmap.lookup(src, struct.pack("=i", 0), 4) or b"", "little")
                assert inner == bpfmap.map_info(lab.prima.label_map_fd).id, f"round {i}: not the live label map"
                r = lab.tp_run("tp_srv", "listen", "127.0.0.1", str(lab.other), "0")
                assert r.returncode == 3 and "bind: Operation not permitted" in r.stderr, (i, r)
                assert lab.refused(label="tp_srv", op="bind", port=lab.other, why="no-rule"), f"round {i}"
                r = lab.tp_run("tp_srv", "listen", "127.0.0.1", str(lab.port), "0")
                assert r.returncode == 0 and r.stdout.strip() == f"listening {lab.port}", (i, r)
                deadline = time.monotonic() + 10
                while not [e for e in lab.collect() if e.kind is EventKind.PA_LISTENER and e.label == "tp_srv"]:
                    assert time.monotonic() < deadline, f"round {i}: no listener entry"
            finally:
                lab.close()
    finally:
        for fd in held:
            os.close(fd)
