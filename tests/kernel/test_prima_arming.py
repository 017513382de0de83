"""Tracepoint backend: the per-syscall programs are attached only while a labelled process exists
(prima.arming), and a process that enters a label while they are not is held until they are.

Each test starts from an engine that has had no labelled process for longer than the disarm delay,
so its raw sys_enter program (32-bit syscalls) is detached when the TP execs its entrypoint.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from prima.arming import ARMED_RAW, ARMED_TRACEPOINTS
from tests import prima_fixtures as fixtures
from tests.bypass.backend import TRACEPOINT
from tests.bypass.lab import Lab
from tests.bypass.subject import Kit, build_kit, run_outside

pytestmark = list(TRACEPOINT.marks)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return build_kit(tmp_path_factory.mktemp("arming-kit"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    lab = Lab(tmp_path_factory.mktemp("arming-lab"))
    yield lab
    lab.close()


def attached(lab: Lab) -> set[str]:
    """The armed programs attached now (bcc's names)."""
    bpf = lab.engine.bpf
    return ({tp for tp in ARMED_RAW if tp.encode() in bpf.raw_tracepoint_fds}
            | {tp for tp in ARMED_TRACEPOINTS if tp.encode() in bpf.tracepoint_fds})


def wait_disarmed(lab: Lab) -> None:
    """Until the engine detached its armed programs (no labelled process for DISARM_AFTER_S)."""
    fixtures.wait_disarmed(lab.engine)
    assert attached(lab) == set()


def state(pid: int) -> str:
    """The process's state letter (/proc/PID/stat: T = stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_state(pid: int, want: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while (s := state(pid)) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return s


def start_in(entrypoint: str, script: str, *argv: str) -> subprocess.Popen:
    """The label's entrypoint (a shell) running `script`; its stdin is a pipe (`read x` waits on it)."""
    return subprocess.Popen([entrypoint, "-c", script, *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_armed_programs_are_attached_only_while_a_labelled_process_exists(lab: Lab, kit: Kit) -> None:
    tp = lab.label(trusted=kit.trusted)
    wait_disarmed(lab)
    arms = lab.engine.arming.arms
    with start_in(tp.entrypoint, "read x; echo done") as p:
        deadline = time.monotonic() + 10
        while attached(lab) != {*ARMED_RAW, *ARMED_TRACEPOINTS} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert attached(lab) == {*ARMED_RAW, *ARMED_TRACEPOINTS}
        assert p.pid in lab.labelled_processes()
        assert p.communicate("\n", timeout=30)[0] == "done\n" and p.returncode == 0
    assert lab.engine.arming.arms == arms + 1
    wait_disarmed(lab)
    assert not tp.violations(timeout=0.3)


def test_compat_syscall_of_the_first_tp_after_none_is_caught(lab: Lab, kit: Kit) -> None:
    """No labelled process, raw sys_enter detached: a TP's first act is a 32-bit syscall."""
    tp = lab.label(trusted=kit.trusted)
    wait_disarmed(lab)
    r = subprocess.run([tp.entrypoint, "-c", f'exec {kit.attack} int80-getpid'], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == -9 and "pid" not in r.stdout, (r.returncode, r.stdout, r.stderr)
    [v] = tp.violations("compat-syscall")
    assert v.detail["action"] == "killed" and v.detail["why"] == "compat-syscall" and v.detail["comm"] == "attack"


def test_a_tp_entering_while_disarmed_is_held_before_its_first_instruction(lab: Lab, kit: Kit) -> None:
    """While the arming thread cannot arm, the TP stays stopped at its exec (it printed nothing); once
    the programs are attached it runs, and its 32-bit syscall is killed and logged."""
    tp = lab.label(trusted=kit.trusted)
    wait_disarmed(lab)
    arming = lab.engine.arming
    with arming.hold():
        p = start_in(tp.entrypoint, 'exec "$0" "$@"', kit.attack, "int80-getpid")
        assert wait_state(p.pid, "T") == "T"  # held: SIGSTOP taken on its way to user space
        assert attached(lab) == set() and not arming.armed
        assert lab.labelled_processes().get(p.pid) == tp.name
        time.sleep(0.2)
        assert state(p.pid) == "T"
    out, err = p.communicate(timeout=30)
    assert p.returncode == -9 and "pid" not in out, (p.returncode, out, err)
    assert arming.armed
    [v] = tp.violations("compat-syscall")
    assert v.detail["action"] == "killed"


def test_a_held_tp_continued_by_another_process_is_a_violation(lab: Lab, kit: Kit) -> None:
    """SIGCONT to a held TP before the engine armed: the sender is killed and the violation names both;
    the TP, which ran unarmed, is killed when the engine arms."""
    tp = lab.label(trusted=kit.trusted)
    wait_disarmed(lab)
    with lab.engine.arming.hold():
        p = start_in(tp.entrypoint, "read x; echo ran")
        assert wait_state(p.pid, "T") == "T"
        r = run_outside("/bin/kill", "-CONT", str(p.pid))  # procps kill(1): an unlabelled sender
        assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)
    assert p.wait(timeout=30) == -9  # killed when the engine armed, while it still waited for its input
    out, _ = p.communicate()
    assert out == "", out
    [v] = tp.violations("release")
    assert v.detail["why"] == "continued-before-armed" and v.detail["action"] == "killed"
    actor, subject = v.subject.split("->")
    assert actor.endswith(",-)") and subject == f"tgid={p.pid}({tp.name})", v.subject
