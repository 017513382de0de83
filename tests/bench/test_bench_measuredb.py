"""Measurement DB build speed vs `find | xargs -P2 sha256sum` on the same files, in the same run.

Page cache: WARM for both. Dropping caches on a machine others share would
slow their work and make the figures depend on them; instead every file is
read once before timing, and each contender runs 3 times (best kept).
Figures are printed (run with -s); nothing here asserts on time.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from prima.measuredb import MeasureDB
from prima.sources import build

DIRS = ("/usr/bin", "/usr/lib/x86_64-linux-gnu")
ROUNDS = 3
BASELINE = f"find {' '.join(DIRS)} -type f -print0 | xargs -0 -P2 sha256sum > /dev/null"


def _best(fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(ROUNDS):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def test_bench_build_cold_and_incremental(tmp_path: Path, bench_record) -> None:
    files = subprocess.run(["find", *DIRS, "-type", "f"], capture_output=True, text=True, check=True).stdout.splitlines()
    total = sum(os.lstat(f).st_size for f in files)
    # Warm the page cache for both contenders.
    subprocess.run(f"find {' '.join(DIRS)} -type f -print0 | xargs -0 -P2 cat > /dev/null", shell=True, check=True)

    t_base, _ = _best(lambda: subprocess.run(BASELINE, shell=True, check=True))

    rounds = iter(range(ROUNDS))
    t_cold, cold = _best(lambda: build(tmp_path / f"cold{next(rounds)}.db", from_dir=list(DIRS), trust_set="bench"))
    db = tmp_path / f"cold{ROUNDS - 1}.db"
    t_incr, incr = _best(lambda: build(db, from_dir=list(DIRS), trust_set="bench"))

    with MeasureDB.open(db) as mdb:
        code_bytes = sum(os.stat(m.path).st_size for m in mdb.measurements("bench"))
    assert cold.measured > 1000 and cold.untrusted == 0
    assert incr.digest == cold.digest and incr.reused == len(files)

    mb = 1 << 20
    print(
        f"\nmeasurement DB bench ({len(files)} files, {total / mb:.0f} MiB, of which {cold.measured} code files,"
        f" {code_bytes / mb:.0f} MiB hashed; page cache warm for both; best of {ROUNDS})\n"
        f"  baseline  find|xargs -P2 sha256sum : {t_base:6.3f} s  ({total / mb / t_base:7.0f} MiB/s over all files)\n"
        f"  cold build                         : {t_cold:6.3f} s  ({code_bytes / mb / t_cold:7.0f} MiB/s hashed)\n"
        f"  incremental build, nothing changed : {t_incr:6.3f} s\n"
        f"  RATIO cold vs baseline (same files, time)   : {t_base / t_cold:5.2f}  (target >= 0.9)\n"
        f"  RATIO hashing throughput vs baseline        : {(code_bytes / t_cold) / (total / t_base):5.2f}\n"
        f"  RATIO incremental speed-up over cold        : {t_cold / t_incr:5.1f}x (target >= 20x)"
    )
    bench_record("measuredb: cold build speed vs find|xargs sha256sum", len(files) / t_cold, len(files) / t_base,
                 "files/s", target=0.9, higher_is_better=True)
    bench_record("measuredb: incremental build time vs cold", t_incr, t_cold, "s", target=1 / 20)
