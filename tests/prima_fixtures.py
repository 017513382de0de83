"""Test-side views of a running prima Engine, kernel-view entries made without a measurement DB, and a
`cwlite enforce` daemon run for the length of a block.

The daemon gets its entries from prima.kernelview.kernel_view (a MeasureDB)
and never asks which processes carry a label or how long its programs ran;
tests and benchmarks do, so those views live here, on Engine's public
surface (`engine.bpf`, `engine.loaded`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from prima import measure, selfprotect
from prima.engine import Engine
from prima.kernelview import KernelEntry, KernelIdentity, Watch

CWLITE = str(Path(sys.executable).with_name("cwlite"))


@contextlib.contextmanager
def enforce_daemon(*args: str) -> Iterator[subprocess.Popen]:
    """`cwlite enforce ARGS`, enforcing when the block starts; stopped with SIGTERM (exit 0) when it ends,
    one poll period after the block (for the last records); killed if the block raised."""
    daemon = subprocess.Popen([CWLITE, "enforce", *args], stderr=subprocess.PIPE, text=True)
    try:
        assert "enforcing" in daemon.stderr.readline()
        yield daemon
        time.sleep(0.5)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def measure_files(paths: Iterable[str | os.PathLike[str]], sets_mask: int, watch: Watch | None = None) -> list[KernelEntry]:
    """Stat and hash files into kernel-view entries, each trusted for `sets_mask` (no DB, no cache).
    `watch` (Engine.watch) gets the keys before any is read; a file open for write while it is read
    is left out, as kernel_view leaves it out (its content may be changing)."""
    ids = KernelIdentity()
    sts = [(os.fspath(p), os.stat(p)) for p in paths]
    if watch is not None:
        watch([(ids.dev(p, st.st_dev), st.st_ino) for p, st in sts])
    out = []
    for p, st in sts:
        measured_ns = time.monotonic_ns()
        m = measure.measure_file(os.path.realpath(p), only_code=False)
        if m is None or not m.stable or (m.ident.dev, m.ident.ino) != (st.st_dev, st.st_ino):
            continue
        out.append(KernelEntry(ids.dev(p, st.st_dev), st.st_ino, m.ident.ctime_ns, sets_mask, m.sha256, p, measured_ns))
    return out


def labelled_processes(engine: Engine) -> dict[int, str]:
    """tgid -> label name of every process the kernel holds a TP label for (BPF: cwl_task_labels;
    the daemon's own reserved label is left out)."""
    assert engine.loaded is not None
    names = {lid: name for name, lid in engine.loaded.labels.items()}
    table = engine.bpf[b"cwl_task_labels"]
    daemon = selfprotect.daemon_label()
    return {k.value: names.get(v.label, f"#{v.label}") for k, v in table.items() if v.label != daemon}


def table_fd(engine: Engine, name: str) -> int:
    """The fd of one of the engine's maps, any type bcc made (task storage included), owned by the engine."""
    from bcc import libbcc  # after the engine loaded: bcc decides at import where tracefs is (ebpf.loader)

    fd = libbcc.lib.bpf_table_fd(engine.bpf.module, name.encode())
    assert fd >= 0, f"no map {name!r} in the engine's BPF object"
    return fd


def program_ids(engine: Engine) -> set[int]:
    """Kernel ids of the engine's programs (what `bpftool prog/link show` lists)."""
    return selfprotect.program_objects(engine.bpf)[0]


def program_stats(engine: Engine) -> dict[str, tuple[int, int]]:
    """Per program: (runs, total ns) as the kernel counts them (only while BPF stats are enabled)."""
    out = {}
    for name, fn in engine.bpf.funcs.items():
        info = dict(line.split(":\t", 1) for line in Path(f"/proc/self/fdinfo/{fn.fd}").read_text().splitlines()
                    if ":\t" in line)
        out[name.decode() if isinstance(name, bytes) else name] = (int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0)))
    return out


@contextlib.contextmanager
def detached(engine: Engine, only: tuple[str, ...] = ()) -> Iterator[None]:
    """Detach every program the engine has attached (or only the raw tracepoints named in `only`)
    for a baseline round, keeping them loaded (no recompile between rounds); the arming thread
    (prima.arming) is held meanwhile, so it neither attaches nor detaches. The same set is attached
    again after.

    Benchmark only: this is an unenforced window, which the engine itself never opens.
    """
    bpf = engine.bpf
    with engine.arming.hold() if engine.arming is not None else contextlib.nullcontext():
        raw = [tp for tp in bpf.raw_tracepoint_fds if not only or tp.decode() in only]
        tps = [] if only else list(bpf.tracepoint_fds)
        for tp in raw:
            bpf.detach_raw_tracepoint(tp=tp)
        for tp in tps:
            bpf.detach_tracepoint(tp=tp)
        try:
            yield
        finally:
            for tp in raw:
                bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
            for tp in tps:
                bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__", 1))


def wait_disarmed(engine: Engine, timeout: float = 15.0) -> None:
    """Until the tracepoint backend's arming thread has detached the per-syscall programs it attaches
    only while a labelled process exists (prima.arming: DISARM_AFTER_S after the last one left)."""
    deadline = time.monotonic() + timeout
    while engine.arming is not None and engine.arming.armed:
        assert time.monotonic() < deadline, f"still armed: labelled {labelled_processes(engine)}"
        time.sleep(0.05)
