"""The seed's own workload: `make -j2` of OpenSSH 9.2p1 (Debian's source package) under a TP label,
PRIMA enforcing (tracepoint backend; no measurement log, no network rules) vs not loaded.

One engine serves every round; a "not loaded" round detaches all its programs (tests.prima_fixtures
`detached`), so no recompile sits between rounds. Rounds alternate which configuration goes first.
Each build is `make clean` (not timed) then `make -j2` (timed: wall, and CPU of make and its children).
The trust set is the toolchain from dpkg with its dependencies, plus what the build runs besides the
compiler (sed, coreutils, ...) and the linker plugin `ar` loads from /usr/lib/bfd-plugins (LLVMgold,
from llvm-14-linker-tools, which needs libLLVM-14 from libllvm14).
"""
from __future__ import annotations

import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from controlplane.core.policy import parse_policy
from prima.engine import Engine
from prima.kernelview import kernel_view
from prima.measuredb import MeasureDB
from prima.sources import build
from tests.bench.openssh import openssh_tree
from tests.conftest import requires
from tests.prima_fixtures import detached

pytestmark = [pytest.mark.bench, requires(root=True), requires(tool="gcc")]

ROUNDS = 5  # the issue's own measurement: 5 interleaved rounds
TOOLCHAIN = ["gcc-12", "cpp-12", "binutils", "make", "dash", "bash", "coreutils", "sed", "grep", "mawk",
             "findutils", "llvm-14-linker-tools", "libllvm14"]


def _make(make: Path, tree: Path) -> tuple[float, float]:
    """make clean (not timed), then make -j2: (wall s, CPU s of make and its children)."""
    subprocess.run([str(make), "-s", "clean"], cwd=tree, check=True, capture_output=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    r = subprocess.run([str(make), "-s", "-j2"], cwd=tree, capture_output=True, text=True)
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.timeout(7200)  # six builds of several minutes each on a loaded 2-core machine
def test_openssh_make_j2_under_a_tp_label(tmp_path: Path, bench_record) -> None:
    tree = tmp_path / "openssh"
    shutil.copytree(openssh_tree(), tree, symlinks=True)  # the cache is shared: build a private copy
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make = bin_dir / "make"
    shutil.copy2("/usr/bin/make", make)  # the label's entrypoint (test-local)
    db_path = tmp_path / "toolchain.db"
    build(db_path, from_dir=[bin_dir], from_dpkg=TOOLCHAIN, deps=True, trust_set="toolchain")
    policy = parse_policy(f'mode = "enforce"\ntrust_sets = ["toolchain"]\n[labels.tp_build]\nentrypoints = ["{make}"]\n'
                          f'trust_set = "toolchain"\n', source="openssh.toml")
    with MeasureDB.open(db_path) as db:
        view = kernel_view(db, policy.trust_sets())
    plain: list[tuple[float, float]] = []
    enforced: list[tuple[float, float]] = []
    violations = []
    with Engine(policy, view) as engine:
        for i in range(ROUNDS):
            order = ("plain", "enforced") if i % 2 == 0 else ("enforced", "plain")
            for which in order:
                if which == "plain":
                    with detached(engine):
                        plain.append(_make(make, tree))
                else:
                    enforced.append(_make(make, tree))
            events = engine.poll(100)
            violations += [e for e in events if e.kind.value == "violation"]
            assert any(e.kind.value == "label-transition" for e in events)
    assert (tree / "sshd").exists() and (tree / "ssh").exists()
    print(f"\nOpenSSH 9.2p1 make -j2 under tp_build ({len(view)} trusted files), PRIMA enforcing (tracepoint) vs "
          f"not loaded, {ROUNDS} interleaved rounds (medians; ratio = median of per-round ratios):")
    for name, i in (("wall", 0), ("CPU", 1)):
        p, e = statistics.median(v[i] for v in plain), statistics.median(v[i] for v in enforced)
        ratio = statistics.median(x[i] / y[i] for x, y in zip(enforced, plain))
        print(f"  {name:4s} {p:7.1f} s not loaded, {e:7.1f} s enforcing: {(e / p - 1) * 100:+.2f}% (per-round ratio "
              f"{ratio:.4f}; rounds {', '.join(f'{v[i]:.1f}' for v in plain)} / {', '.join(f'{v[i]:.1f}' for v in enforced)})")
        bench_record(f"openssh: make -j2 under a TP label, PRIMA enforcing, {name}", e, p, "s",
                     target=1.01 if i == 1 else None, ratio=ratio, samples=[v[i] for v in enforced])
    assert violations == [], [(v.op, v.subject, dict(v.detail)) for v in violations]
