"""Port Authority's cost on the host kernel (tracepoint backend): loopback TCP connect+accept rate and a
bulk transfer through an allowed port, and the tc classifier's per-packet cost on a veth pair.

Each figure compares Port Authority attached vs detached (`Engine.attached`, the same loaded
programs and maps) in interleaved rounds of one run, so other load on the machine hits both alike.
The server is a TP (tp_srv, listening on the port its rule opens); the client is unlabelled.
Printed, never asserted on time.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bypass.portauthority import PEER_PY, PaLab
from tests.conftest import requires
from tests.prima_fixtures import program_stats

pytestmark = [pytest.mark.bench, requires(root=True), requires(tool="gcc")]

ROUNDS = 8
CONNECTS = 2000
BULK_MB = 256
FLOOD = 200_000

CLIENT_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
/* client PORT N BYTES: N connections to 127.0.0.1:PORT, each sending BYTES then closing; waits for
   the server's close of each; prints wall ns for all N. */
int main(int argc, char **argv)
{
	int port = atoi(argv[1]), n = atoi(argv[2]);
	long bytes = atol(argv[3]);
	static char buf[1 << 16];
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	struct timespec t0, t1;
	inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < n; i++) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 3; }
		for (long left = bytes; left > 0;) {
			ssize_t w = write(s, buf, left < (long)sizeof buf ? left : (long)sizeof buf);
			if (w <= 0) { perror("write"); return 3; }
			left -= w;
		}
		shutdown(s, SHUT_WR);
		while (read(s, buf, sizeof buf) > 0) ;
		close(s);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%lld\n", (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return 0;
}
"""

SERVER_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
/* server PORT: accept forever; read each connection to EOF, then close it. */
int main(int argc, char **argv)
{
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	static char buf[1 << 16];
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
	inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 128)) { perror("bind/listen"); return 3; }
	printf("listening %d\n", atoi(argv[1])); fflush(stdout);
	for (;;) {
		int c = accept(s, 0, 0);
		if (c < 0) continue;
		while (read(c, buf, sizeof buf) > 0) ;
		close(c);
	}
}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("pa-bench")
    for name, text in (("client", CLIENT_C), ("server", SERVER_C)):
        (root / f"{name}.c").write_text(text)
        subprocess.run(["gcc", "-O2", "-o", str(root / name), str(root / f"{name}.c")], check=True)
    lab = PaLab(root, backend="tracepoint", extra_trusted=[str(root / "server")])
    yield lab
    lab.close()


def _rounds(lab: PaLab, measure) -> tuple[float, float]:
    """Median of `measure()` with Port Authority detached and attached, ROUNDS interleaved rounds each."""
    off, on = [], []
    for i in range(ROUNDS):
        for attached, out in ((False, off), (True, on)) if i % 2 else ((True, on), (False, off)):
            lab.pa.attached(attached)
            out.append(measure())
    lab.pa.attached(True)
    return statistics.median(off), statistics.median(on)


def test_loopback_tcp_connect_accept_and_bulk(lab: PaLab) -> None:
    root = Path(lab.nethelper).parent
    server = subprocess.Popen([lab.entry["tp_srv"], "-c", f"exec {root / 'server'} {lab.port}"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert lab.first_line(server) == f"listening {lab.port}"
        run = lambda n, size: int(subprocess.run([str(root / "client"), str(lab.port), str(n), str(size)],
                                                 capture_output=True, text=True, check=True).stdout)
        c_off, c_on = _rounds(lab, lambda: run(CONNECTS, 1))
        b_off, b_on = _rounds(lab, lambda: run(1, BULK_MB << 20))
    finally:
        server.kill()
        server.wait()
    assert not lab.refused(label="tp_srv")   # every connection was allowed
    print(f"\nPort Authority, loopback TCP into a TP's allowed port ({ROUNDS} interleaved rounds, medians):")
    print(f"  connect+accept: {c_off / CONNECTS / 1000:.1f} us detached, {c_on / CONNECTS / 1000:.1f} us attached, "
          f"ratio {c_on / c_off:.3f}")
    print(f"  bulk {BULK_MB} MiB: {BULK_MB * 1e9 / b_off / 1024:.2f} GiB/s detached, "
          f"{BULK_MB * 1e9 / b_on / 1024:.2f} GiB/s attached, time ratio {b_on / b_off:.3f}")


def test_tc_classifier_per_packet(lab: PaLab) -> None:
    def flood() -> float:
        t = time.monotonic()
        out = subprocess.run([sys.executable, "-c", PEER_PY, lab.ns, lab.peer_ip, "flood", lab.host_ip,
                              str(lab.other), str(FLOOD)], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == f"sent {FLOOD}"
        return time.monotonic() - t

    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
    try:
        before = program_stats(lab.pa)["pa_tc_ingress"]
        off, on = _rounds(lab, flood)
        after = program_stats(lab.pa)["pa_tc_ingress"]
    finally:
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text("0")
    runs, ns = after[0] - before[0], after[1] - before[1]
    # bpf_stats_enabled is one machine-wide switch: another benchmark that turns it off meanwhile leaves
    # no runs counted; then only the sender's rates are reported
    inside = f"{ns / runs:.0f} ns per packet inside the program ({runs} packets)" if runs else "kernel stats were off"
    print(f"\nPort Authority tc classifier on a veth pair, UDP to a port no rule governs: {inside}; "
          f"sender {FLOOD / off / 1000:.0f} kpps detached, {FLOOD / on / 1000:.0f} kpps attached "
          f"(ratio {off / on:.3f})")
