"""Measurement-log throughput against raw PCR extends, same swtpm, same run (`make bench`).

Three figures from alternating rounds (raw measured right before and after each log round,
so load from other processes hits both sides alike); medians are reported:
- raw: Tpm.extend (tpm2-pytss PCR_Extend over the swtpm TCTI) in a loop;
- log: MeasurementLog.record for each event, then flush: every entry appended,
  fdatasync'ed (grouped by the commit thread) and then extended;
- log, one fsync per entry: record(wait=True), i.e. no grouping (what grouping buys).
Target: log / raw >= 0.8.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from controlplane.core import imalog
from controlplane.core.events import Event, EventKind
from controlplane.host import mlog
from tests.conftest import requires
from tests.tpm_fixtures import swtpm, swtpm_template, tpm  # noqa: F401

pytestmark = requires(tool="swtpm")
N = 3000
ROUNDS = 9
LOG_PCR = 23          # resettable at locality 0: each round starts a fresh log on a reset PCR
RAW_PCR = 16


def _events(n: int, salt: int) -> list[Event]:
    return [Event(EventKind.TRUSTED_LOAD, hashlib.sha256(b"%d-%d" % (salt, i)).digest(), "tp_build", "exec",
                  f"/usr/lib/gcc/x86_64-linux-gnu/12/cc1-{i}") for i in range(n)]


def _fresh_log(tpm, path: Path) -> mlog.MeasurementLog:
    tpm.reset_pcr(LOG_PCR)
    for p in (path, path.with_name(path.name + ".state")):
        p.unlink(missing_ok=True)
    return mlog.MeasurementLog.open(path, tpm, pcr=LOG_PCR)


def _tools_rate(tcti: str, n: int = 40) -> float | None:
    """tpm2_pcrextend, one process per extend (for scale: what a shell-script log would get)."""
    if shutil.which("tpm2_pcrextend") is None:
        return None
    env = dict(os.environ, TPM2TOOLS_TCTI=tcti)
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(["tpm2_pcrextend", f"{RAW_PCR}:sha256=" + "ab" * 32], env=env, check=True, capture_output=True)
    return n / (time.perf_counter() - t0)


def test_log_rate_vs_raw_extend(swtpm, tpm, tmp_path: Path, bench_record) -> None:
    raw, grouped, single = [], [], []
    digest = hashlib.sha256(b"raw").digest()
    path = tmp_path / "m.log"
    def raw_rate() -> float:
        t0 = time.perf_counter()
        for _ in range(N // 2):
            tpm.extend(RAW_PCR, digest)
        return (N // 2) / (time.perf_counter() - t0)

    for r in range(ROUNDS):
        before = raw_rate()

        events = _events(N, r)
        with _fresh_log(tpm, path) as log:
            t0 = time.perf_counter()
            for e in events:
                log.record(e)
            log.flush()
            grouped.append(N / (time.perf_counter() - t0))
            assert imalog.replay(log.entries(), LOG_PCR) == tpm.read_pcr(LOG_PCR)
        raw.append((before + raw_rate()) / 2)   # raw measured just before and just after the log round

        n_single = N // 10
        with _fresh_log(tpm, path) as log:
            t0 = time.perf_counter()
            for e in events[:n_single]:
                log.record(e, wait=True)
            single.append(n_single / (time.perf_counter() - t0))
            assert imalog.replay(log.entries(), LOG_PCR) == tpm.read_pcr(LOG_PCR)

    ratios = [g / r for g, r in zip(grouped, raw)]
    raw_m, grouped_m, single_m = (statistics.median(x) for x in (raw, grouped, single))
    print(f"\n[bench mlog] {ROUNDS} alternating rounds of {N} entries on one swtpm")
    print(f"[bench mlog] raw PCR_Extend (tpm2-pytss): median {raw_m:,.0f}/s")
    print(f"[bench mlog] log + fsync + extend, grouped fsync: median {grouped_m:,.0f}/s; "
          f"ratio per round {', '.join(f'{x:.2f}' for x in ratios)}; median ratio {statistics.median(ratios):.2f} "
          f"(target >= 0.8)")
    print(f"[bench mlog] log + fsync + extend, one fsync per entry (no grouping): median {single_m:,.0f}/s; "
          f"ratio {single_m / raw_m:.2f}")
    bench_record("mlog: log+fsync+extend rate vs raw PCR_Extend", grouped_m, raw_m, "entries/s", target=0.8,
                 higher_is_better=True, ratio=statistics.median(ratios), samples=grouped)
    bench_record("mlog: one fsync per entry vs raw PCR_Extend", single_m, raw_m, "entries/s", higher_is_better=True,
                 samples=single)
    tools = _tools_rate(swtpm.tcti)
    if tools is not None:
        print(f"[bench mlog] tpm2_pcrextend, one process per extend: {tools:,.0f}/s")
