"""Prometheus metrics scraped over real HTTPS from a running attestation service, and from `verify --watch`.

The service runs with PRIMA (tracepoint backend, audit mode) and swtpm, as in
the demo. The scrape is pinned to the service's fresh self-signed certificate.
Each counter must move with what really happened between two scrapes: a
verifier round (a quote, its liveness entry), then an untrusted exec under the
TP label (a violation).
"""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.cli.demo import LABEL, Demo, prepare
from controlplane.verifier import registrar
from tests.conftest import requires

pytestmark = [requires(root=True), requires(tool="swtpm"), pytest.mark.timeout(400)]

CWLITE = str(Path(sys.executable).with_name("cwlite"))


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _scrape(url: str, cert_pem: bytes) -> dict[tuple[str, tuple], float]:
    ctx = ssl.create_default_context(cadata=cert_pem.decode())   # this service's certificate, nothing else
    r = httpx.get(f"{url}/metrics", verify=ctx, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return _samples(r.text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_metrics_move_with_rounds_and_violations(tmp_path: Path) -> None:
    layout = prepare(tmp_path)
    with Demo.start(layout) as demo:
        url, cert = demo.running.url, demo.running.state.tls.cert_pem
        demo.enrol()
        before = _scrape(url, cert)
        assert before[("cwlite_log_entries", ())] == len(demo.running.log)
        assert before[("cwlite_events_total", (("kind", "daemon-start"),))] == 1
        assert before.get(("cwlite_violations_total", (("label", LABEL),)), 0) == 0

        assert demo.attest().verdict == "trusted"
        r = demo.run_as_tp(layout.untrusted)
        assert r.returncode == 0                      # audit: allowed and logged
        demo.wait_logged(lambda e: e.name.startswith("cwlite:violation:"), what="violation")
        after = _scrape(url, cert)

    assert after[("cwlite_quote_seconds_count", ())] == before.get(("cwlite_quote_seconds_count", ()), 0) + 1
    assert after[("cwlite_events_total", (("kind", "engine-alive"),))] == \
        before.get(("cwlite_events_total", (("kind", "engine-alive"),)), 0) + 1
    assert after[("cwlite_violations_total", (("label", LABEL),))] == 1
    assert after[("cwlite_events_total", (("kind", "violation"),))] == 1
    assert after[("cwlite_lost_events_total", ())] == 0
    # the liveness entry and the violation (at least) were logged and extended since the first scrape
    assert after[("cwlite_log_entries", ())] >= before[("cwlite_log_entries", ())] + 2
    assert after[("cwlite_pcr_extends_total", ())] >= before[("cwlite_pcr_extends_total", ())] + 2


def test_verifier_watch_counts_rounds(tmp_path: Path) -> None:
    layout = prepare(tmp_path)
    with Demo.start(layout) as demo:
        ca = layout.host_dir / "swtpm" / "ca"
        registrar.enrol(demo.running.url, "build-vm-1", demo.store, cas=registrar.load_cas(sorted(ca.glob("*cert*.pem"))),
                        require_ek_cert=True, interval_s=0.5)
        port = _free_port()
        watch = subprocess.Popen([CWLITE, "verify", "--watch", "--rounds", "200", "--data-dir", str(layout.verifier_dir),
                                  "--policy", str(layout.verifier_policy), "--db", str(layout.verifier_db),
                                  "--metrics-port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            key = ("cwlite_verifier_rounds_total", (("host", "build-vm-1"), ("outcome", "trusted")))
            seen: list[float] = []
            deadline = time.monotonic() + 180
            while len(set(seen)) < 3 and time.monotonic() < deadline and watch.poll() is None:
                try:
                    seen.append(_samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text).get(key, 0))
                except httpx.TransportError:
                    pass                      # not listening yet
                time.sleep(0.5)
        finally:
            watch.terminate()
            _, err = watch.communicate(timeout=30)
    assert len(set(seen)) >= 3 and seen == sorted(seen), (seen, err)   # trusted rounds, counted as they ran
