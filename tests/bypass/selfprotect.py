"""Attacks on enforcement itself (issue 22), each written once for both backends.

A tier runs them by subclassing `SelfProtectScenarios` with its backend
(tests/bypass/backend.py): tests/kernel/test_prima_selfprotect.py
(tracepoint, host kernel) and tests/vm/guest/test_lsm_selfprotect.py (lsm, in
the VM). The engine runs in the test process, which is therefore the daemon.
Under lsm an attack is refused with EPERM and the attacker lives; under
tracepoints the attacker is killed at the syscall's entry (a tracepoint cannot
fail a syscall, so the command itself still runs). Both log a violation event,
which every later proof shows.

The attacker is a root process that is not the daemon: `bpftool`, or a small
Python process calling bpf(2) through cext.bpfmap (task storage keys are pidfds,
which bpftool cannot give).
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass

import pytest

from cext import bpfmap
from controlplane.core.errors import KernelError
from controlplane.core.events import Event, EventKind
from prima import selfprotect
from tests.bypass.backend import Backend
from tests.bypass.lab import Lab, OnLab
from prima.kernelview import kernel_dev
from tests.prima_fixtures import program_ids, table_fd

EPERM_TEXT = os.strerror(1)


@dataclass(frozen=True)
class Expect:
    """How a backend answers an attack on cwlite: its event action, and whether the command still ran."""

    backend: str
    action: str          # the violation's detail["action"]
    command_lands: bool  # tracepoint: the bpf(2) command / signal still happens (then the caller dies)

    def stopped(self, r: subprocess.CompletedProcess, what: str) -> None:
        """The attacking process was stopped: killed (tracepoint) or refused with EPERM (lsm)."""
        if self.backend == "tracepoint":
            assert r.returncode == -9, f"{what}: not killed: rc={r.returncode} stdout={r.stdout!r} stderr={r.stderr!r}"
        else:
            assert r.returncode != 0 and EPERM_TEXT in r.stdout + r.stderr, \
                f"{what}: not refused with EPERM: rc={r.returncode} stdout={r.stdout!r} stderr={r.stderr!r}"


def expect(backend: str) -> Expect:
    """The expected outcome of every scenario under `backend`."""
    if backend == "lsm":
        return Expect("lsm", "denied", command_lands=False)
    return Expect("tracepoint", "killed", command_lands=True)


# ---- helpers ----------------------------------------------------------------------------
def bpftool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bpftool", *args], capture_output=True, text=True, timeout=60)


def attacker(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a separate root Python process (not the daemon) with cext.bpfmap imported."""
    prelude = "import os, struct, sys\nfrom cext import bpfmap\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60)


def bcc_map_id(lab, name: str) -> int:
    """The kernel id of one of the engine's fixed (bcc) maps."""
    return bpfmap.map_info(table_fd(lab.engine, name)).id


def hex_bytes(data: bytes) -> list[str]:
    return [f"{b:02x}" for b in data]


def self_violations(lab, op: str, since: int, timeout: float = 5.0) -> list[Event]:
    """Violations `op` logged after event number `since` (lab.events is the whole run's)."""
    lab.wait_for(lambda e: e in lab.events[since:] and e.kind is EventKind.VIOLATION and e.op == op, timeout)
    return [e for e in lab.events[since:] if e.kind is EventKind.VIOLATION and e.op == op]


def mark(lab) -> int:
    """The number of events so far: later checks look only at what came after."""
    return len(lab.collect())


def _label_key(lab, pid: int):
    """(map fd, key) of `pid`'s label: cwl_task_labels[tgid] (tracepoint) or task storage by pidfd (lsm)."""
    if lab.engine.backend == "tracepoint":
        return table_fd(lab.engine, "cwl_task_labels"), struct.pack("=I", pid), None
    pidfd = os.pidfd_open(pid)
    return table_fd(lab.engine, "cwl_task_label_ls"), struct.pack("=i", pidfd), pidfd


def label_of(lab, pid: int) -> int:
    """The label id the kernel holds for process `pid` (0: none), read by the daemon (reads stay allowed)."""
    fd, key, pidfd = _label_key(lab, pid)
    try:
        value = bpfmap.lookup(fd, key, 8)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return struct.unpack("=II", value)[0] if value else 0


# ---- scenarios --------------------------------------------------------------------------
def scenario_delete_tp_label(lab, exp: Expect) -> None:
    """root deletes a running TP's label through bpf(2): refused (lsm) or killed; logged either way."""
    since = mark(lab)
    tp = lab.label()
    sh = subprocess.Popen([tp.entrypoint, "-c", "read x; " + lab.untrusted + "; echo rc=$?"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tp.events(EventKind.LABEL_TRANSITION)
        assert label_of(lab, sh.pid) == lab.engine.loaded.labels[tp.name]
        mid = bcc_map_id(lab, "cwl_task_labels" if exp.backend == "tracepoint" else "cwl_task_label_ls")
        r = attacker(f"""
            fd = bpfmap.fd_by_id({mid})
            key = struct.pack("=I", {sh.pid}) if {exp.backend == "tracepoint"!r} else struct.pack("=i", os.pidfd_open({sh.pid}))
            bpfmap.delete(fd, key)
            print("deleted")
        """)
        exp.stopped(r, "label delete")
        [v] = self_violations(lab, "bpf", since)
        assert v.detail["action"] == exp.action and v.detail["why"] == "not-daemon"
        assert v.subject == f"map-delete-elem map {mid}" and v.detail["tgid"] != os.getpid()
        # lsm: the label is intact, so the TP is still confined; tracepoint: it is gone, and the
        # violation above is what the next proof shows
        assert (label_of(lab, sh.pid) == 0) == exp.command_lands
        out, _ = sh.communicate("go\n", timeout=30)
        if not exp.command_lands:
            assert "rc=126" in out and tp.events(EventKind.VIOLATION, op="exec")
    finally:
        if sh.poll() is None:
            sh.kill()
            sh.wait()


def scenario_forge_trust_entry(lab, exp: Expect) -> None:
    """root inserts an unmeasured file into the live trust map with bpftool: refused (frozen) and logged;
    the daemon itself cannot write it either; the file stays untrusted."""
    since = mark(lab)
    tp = lab.label()
    trust_id = lab.engine.generation_maps()["cwl_trust"]
    st = os.stat(lab.untrusted)
    trust_t = lab.engine.bpf[b"cwl_trust_t"]          # the layouts bcc read from cwlite.h
    key = bytes(trust_t.Key(dev=kernel_dev(st.st_dev), ino=st.st_ino))
    value = bytes(trust_t.Leaf(ctime_ns=st.st_ctime_ns, sets_mask=(1 << 64) - 1))  # a forged digest: zeros
    r = bpftool("map", "update", "id", str(trust_id), "key", "hex", *hex_bytes(key), "value", "hex", *hex_bytes(value))
    exp.stopped(r, "forged trust entry")
    [v] = self_violations(lab, "bpf", since)
    assert v.subject == f"map-update-elem map {trust_id}" and v.detail["action"] == exp.action
    fd = bpfmap.fd_by_id(trust_id)
    try:
        assert bpfmap.lookup(fd, key, len(value)) is None   # frozen: the command that still ran failed
        try:
            bpfmap.update(fd, key, value)                    # the daemon is allowed by the guard...
        except KernelError as exc:
            assert EPERM_TEXT in str(exc)                    # ...but not by the freeze
        else:
            raise AssertionError("a frozen trust map took a write from bpf(2)")
    finally:
        os.close(fd)
    assert "frozen" in bpftool("map", "show", "id", str(trust_id)).stdout
    r = tp.sh(f"{lab.untrusted}; echo rc=$?")
    assert tp.events(EventKind.VIOLATION, op="exec"), r


def scenario_replace_generation_slot(lab, exp: Expect) -> None:
    """root puts its own (permissive) map into the live trust slot: refused or killed, logged."""
    since = mark(lab)
    outer = bcc_map_id(lab, "cwl_trust")
    gen = lab.engine.loaded.generation
    r = attacker(f"""
        mine = bpfmap.create_like(bpfmap.fd_by_id({lab.engine.generation_maps()['cwl_trust']}), "attacker")
        bpfmap.update(bpfmap.fd_by_id({outer}), struct.pack("=I", {gen}), struct.pack("=I", mine))
        print("replaced")
    """)
    exp.stopped(r, "slot replace")
    [v] = self_violations(lab, "bpf", since)
    assert v.subject == f"map-update-elem map {outer}" and v.detail["action"] == exp.action


def scenario_dump_still_works(lab, exp: Expect) -> None:
    """Reads stay allowed: `bpftool map dump` of the live trust map and `map show` of every cwlite map."""
    since = mark(lab)
    trust_id = lab.engine.generation_maps()["cwl_trust"]
    r = bpftool("-j", "map", "dump", "id", str(trust_id))
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == lab.engine.loaded.trusted_files
    r = bpftool("map", "show", "id", str(bcc_map_id(lab, "cwl_gen")))
    assert r.returncode == 0 and "cwl_gen" in r.stdout
    assert not self_violations(lab, "bpf", since, timeout=0.3)


def scenario_link_detach(lab, exp: Expect) -> None:
    """root detaches one of cwlite's links: refused or killed, logged; the program stays attached."""
    since = mark(lab)
    ours = program_ids(lab.engine)
    links = [link for link in json.loads(bpftool("-j", "link", "show").stdout) if link.get("prog_id") in ours]
    assert links, "no bpf link of cwlite's programs"
    link = links[0]
    r = bpftool("link", "detach", "id", str(link["id"]))
    exp.stopped(r, "link detach")
    [v] = self_violations(lab, "bpf", since)
    assert v.subject == f"link-detach link of prog {link['prog_id']}" and v.detail["action"] == exp.action
    assert any(entry["id"] == link["id"] for entry in json.loads(bpftool("-j", "link", "show").stdout))


def scenario_tp_signals_daemon(lab, exp: Expect, target: str) -> None:
    """A TP signals the daemon (this test process: SIGWINCH, which it ignores, so the signal cannot hurt
    the test when it lands) by pid, by its process group (kill 0) or by a thread id: refused or killed."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        lab.collect()  # the engine's poll tracks the daemon's threads
        aim = {"pid": str(os.getpid()), "group": "0", "thread": str(thread.native_id)}[target]
        tp = lab.label()
        r = tp.sh(f"kill -WINCH {aim}; echo rc=$?")
        if exp.backend == "tracepoint":
            assert r.returncode == -9 and "rc=" not in r.stdout, (r.returncode, r.stdout, r.stderr)
        elif target != "group":  # kill(0) succeeds when any group member got the signal (the shell did)
            assert "rc=1" in r.stdout and EPERM_TEXT in r.stderr, (r.stdout, r.stderr)
        [v] = tp.events(EventKind.VIOLATION, op="signal")
        assert v.detail["why"] == "tp-signal" and v.detail["action"] == exp.action
        # tracepoint: the syscall's target argument; lsm: task_kill's task, named by its process
        whom = aim if exp.backend == "tracepoint" else str(os.getpid())
        assert v.subject == f"signal {int(signal.SIGWINCH)} to {whom}", v.subject
    finally:
        stop.set()
        thread.join()


def scenario_daemon_label(lab, exp: Expect) -> None:
    """The daemon holds the reserved label (for the ptrace/memory rule), PRIMA never judges it, and its
    children do not inherit it."""
    assert label_of(lab, os.getpid()) == selfprotect.daemon_label()
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert label_of(lab, child.pid) == 0
    finally:
        child.kill()
        child.wait()
    # the daemon runs unmeasured code freely: PRIMA sees it as unlabelled
    r = subprocess.run([lab.untrusted], capture_output=True)
    assert r.returncode == 0
    lab.collect()
    assert not [e for e in lab.events if e.label == selfprotect.DAEMON_LABEL_NAME and e.kind is EventKind.VIOLATION
                and e.op not in ("bpf", "signal")]


def scenario_reload_makes_fresh_frozen_maps(lab, exp: Expect) -> None:
    """A policy reload installs new, frozen maps (old ones are freed) and enforcement goes on."""
    before = lab.engine.generation_maps()
    tp = lab.label()
    after = lab.engine.generation_maps()
    assert set(after) == set(before) and not set(after.values()) & set(before.values())
    for mid in after.values():
        assert "frozen" in bpftool("map", "show", "id", str(mid)).stdout
    assert tp.sh("/usr/bin/true; echo rc=$?").stdout.strip() == "rc=0"
    tp.sh(f"{lab.untrusted}; echo rc=$?")
    [v] = tp.events(EventKind.VIOLATION, op="exec")
    assert v.detail["action"] == exp.action


class SelfProtectScenarios(OnLab):
    """Every attack on cwlite itself, against the class's `backend`."""

    backend: Backend
    lab_dir = "selfprotect"


    @property
    def expect(self) -> Expect:
        return expect(self.backend.name)

    def test_deleting_a_tp_label_is_stopped_and_logged(self, lab: Lab) -> None:
        scenario_delete_tp_label(lab, self.expect)

    def test_forged_trust_entry_is_refused_by_the_freeze(self, lab: Lab) -> None:
        scenario_forge_trust_entry(lab, self.expect)

    def test_replacing_a_generation_slot_is_stopped(self, lab: Lab) -> None:
        scenario_replace_generation_slot(lab, self.expect)

    def test_map_dump_still_works(self, lab: Lab) -> None:
        scenario_dump_still_works(lab, self.expect)

    def test_link_detach_is_stopped(self, lab: Lab) -> None:
        scenario_link_detach(lab, self.expect)

    @pytest.mark.parametrize("target", ["pid", "group", "thread"])
    def test_tp_signal_to_the_daemon_is_stopped(self, lab: Lab, target: str) -> None:
        scenario_tp_signals_daemon(lab, self.expect, target)

    def test_daemon_holds_the_reserved_label(self, lab: Lab) -> None:
        scenario_daemon_label(lab, self.expect)

    def test_reload_makes_fresh_frozen_maps(self, lab: Lab) -> None:
        scenario_reload_makes_fresh_frozen_maps(lab, self.expect)
