"""Soak (`make soak`, not in `make test`): a labelled build loop for CWLITE_SOAK_S seconds (default
1800) under `cwlite serve --enforce` (tracepoint backend), the verifier attesting as it goes.

Sampled after every build: the daemon's RSS (/proc/PID/status VmRSS) and the entry count of every
hash map the daemon holds (its bpf-map descriptors in /proc/PID/fdinfo, dumped with bpftool).
Asserted at the end: both flat (after the first minute's warm-up: RSS within 10% + 8 MiB of its
warm level, every map at most its warm-up maximum), every build enforced and trusted (no violation,
no lost events), and every round's proof of the log replayed. The samples go to
bench-results/soak.jsonl and a plot, soak.png.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.bench.record import RESULTS_DIR, record
from tests.bypass.lab import c_project
from tests.conftest import requires
from tests.e2e.serve_process import (attest, enrol, free_port, serve_enforcing, stop_orphan_swtpm, toolchain_layout,
                                     verifier_of)

SOAK_S = float(os.environ.get("CWLITE_SOAK_S", "1800"))
WARMUP_S = min(60.0, SOAK_S / 4)
ATTEST_EVERY_S = 30.0
pytestmark = [requires(root=True), requires(tool="swtpm"), requires(tool="gcc"), requires(tool="bpftool"),
              pytest.mark.timeout(int(SOAK_S) + 1200)]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def hash_map_sizes(pid: int) -> dict[str, int]:
    """Entries in each hash map process `pid` holds open (name from bpftool, as the kernel truncates it)."""
    sizes = {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                        if ":\t" in line)
        except (FileNotFoundError, ValueError):
            continue
        if "map_id" not in info or info.get("map_type", "").strip() not in ("1", "9"):   # HASH, LRU_HASH
            continue
        map_id = info["map_id"].strip()
        show = json.loads(subprocess.run(["bpftool", "map", "show", "id", map_id, "-j"], capture_output=True,
                                         text=True, check=True).stdout)
        dump = json.loads(subprocess.run(["bpftool", "map", "dump", "id", map_id, "-j"], capture_output=True,
                                         text=True, check=True).stdout)
        sizes[f"{show.get('name', '?')}#{map_id}"] = len(dump)
    return sizes


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a.plot(t, [s["rss_kib"] / 1024 for s in samples])
    a.set_ylabel("daemon RSS (MiB)")
    a.set_ylim(bottom=0)
    for name in samples[-1]["maps"]:
        b.plot(t, [s["maps"].get(name, 0) for s in samples], label=name.split("#")[0])
    b.set_ylabel("hash map entries")
    b.set_xlabel("minutes of labelled builds")
    b.legend(fontsize=7, ncol=2)
    a.set_title("cwlite soak: daemon memory and BPF map sizes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def test_soak_a_labelled_build_loop(tmp_path: Path) -> None:
    layout = toolchain_layout(tmp_path / "work")
    src = c_project(tmp_path)
    make = [str(layout.entry), "-s", "-B", "-j2", "-C", str(src)]
    port = free_port()
    samples: list[dict] = []
    rounds = []
    builds = 0
    try:
        with verifier_of(layout) as (store, key):
            with serve_enforcing(layout, port) as daemon:
                enrol(layout, port, store)
                t0 = last_attest = time.monotonic()
                rounds.append(attest(layout, store, key))
                while time.monotonic() - t0 < SOAK_S:
                    r = subprocess.run(make, capture_output=True, text=True, timeout=600)
                    assert r.returncode == 0, r.stderr
                    builds += 1
                    samples.append({"t": time.monotonic() - t0, "builds": builds, "rss_kib": rss_kib(daemon.pid),
                                    "maps": hash_map_sizes(daemon.pid)})
                    if time.monotonic() - last_attest > ATTEST_EVERY_S:
                        rounds.append(attest(layout, store, key))
                        last_attest = time.monotonic()
                rounds.append(attest(layout, store, key))
    finally:
        stop_orphan_swtpm(layout)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "soak.jsonl").write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in samples))
    plot(samples, RESULTS_DIR / "soak.png")
    warm = [s for s in samples if s["t"] <= WARMUP_S] or samples[:1]
    later = [s for s in samples if s["t"] > WARMUP_S]
    warm_rss = max(s["rss_kib"] for s in warm)
    end_rss = max(s["rss_kib"] for s in later) if later else warm_rss
    print(f"\nsoak: {SOAK_S:.0f} s, {builds} labelled builds, {len(rounds)} attestation rounds; daemon RSS "
          f"max {warm_rss / 1024:.1f} MiB in the warm-up, max {end_rss / 1024:.1f} MiB after it; "
          f"final map sizes {samples[-1]['maps']}")
    record("soak: daemon RSS growth after warm-up", end_rss / 1024, warm_rss / 1024, "MiB", target=1.10,
           samples=[s["rss_kib"] / 1024 for s in samples], note=f"{SOAK_S:.0f} s, {builds} builds",
           test="tests/soak/test_soak.py")
    assert builds >= 3 and later, "too short a soak to judge"
    assert end_rss <= warm_rss * 1.10 + 8 * 1024, (warm_rss, end_rss)
    for name in samples[-1]["maps"]:
        warm_max = max(s["maps"].get(name, 0) for s in warm)
        assert all(s["maps"].get(name, 0) <= warm_max for s in later), (name, [s["maps"].get(name) for s in samples])
    untrusted = [v for a in rounds for v in a.entries if v.verdict == "untrusted"]
    assert not untrusted and all(a.verdict == "trusted" for a in rounds), untrusted[:5]
