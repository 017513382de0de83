"""PRIMA bypass suite on the host kernel (tracepoint backend): real processes under a TP label, real kills, real events.

Each test enters a fresh label through a test-local entrypoint (a copy of
/bin/sh), tries one way of running code, and asserts both the outcome (exit
status; 137 = SIGKILL seen by the calling shell) and the event the engine
produced from the ring buffer.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from controlplane.core.events import EventKind
from tests.conftest import requires
from tests.kernel.prima_lab import LDSO, Lab
from tests.prima_fixtures import labelled_processes

pytestmark = [requires(root=True), requires(tool="gcc")]

KILLED = "rc=137"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("prima"))
    yield lab
    lab.close()


def _violations(label, op):
    return label.events(EventKind.VIOLATION, op=op)


def test_trusted_binary_runs_and_entry_is_logged(lab) -> None:
    tp = lab.label()
    r = tp.sh("/usr/bin/true; echo rc=$?")
    assert r.stdout.strip() == "rc=0"
    [enter] = tp.events(EventKind.LABEL_TRANSITION)
    assert enter.subject == tp.entrypoint and enter.detail["from"] == "" and len(enter.digest) == 32
    loads = tp.events(EventKind.TRUSTED_LOAD)
    subjects = {e.subject for e in loads}
    assert {tp.entrypoint, lab.true, os.path.realpath(LDSO)} <= subjects
    true_load = next(e for e in loads if e.subject == lab.true)
    assert true_load.op == "exec" and true_load.digest == __import__("hashlib").sha256(open(lab.true, "rb").read()).digest()
    assert not tp.events(EventKind.VIOLATION, timeout=0.2)


def test_first_trusted_load_per_label_only(lab) -> None:
    tp = lab.label()
    assert tp.sh("/usr/bin/true; /usr/bin/true; /usr/bin/true; echo ok").stdout.strip() == "ok"
    tp.events(EventKind.TRUSTED_LOAD)
    lab.collect(200)
    assert sum(1 for e in lab.events if e.label == tp.name and e.subject == lab.true and e.op == "exec") == 1


def test_untrusted_binary_is_killed_before_it_runs(lab) -> None:
    tp = lab.label()
    r = tp.sh(f"{lab.untrusted}; echo rc=$?")
    assert r.stdout.strip() == KILLED
    [v] = _violations(tp, "exec")
    assert v.subject == lab.untrusted and v.detail["action"] == "killed" and v.detail["why"] == "unmeasured"


def test_direct_loader_exec_is_caught_at_the_executable_mmap(lab) -> None:
    tp = lab.label()
    r = tp.sh(f"{LDSO} {lab.untrusted}; echo rc=$?")
    assert r.stdout.strip() == KILLED
    [v] = _violations(tp, "mmap")
    assert v.subject == lab.untrusted and v.detail["action"] == "killed"  # the path, from the dentries
    assert v.detail["ino"] == os.stat(lab.untrusted).st_ino
    # ld.so itself is trusted: the exec of the loader was not the violation
    assert not _violations(tp, "exec")


def test_memfd_fexecve_is_caught(lab) -> None:
    tp = lab.label()
    # even with the content of a trusted binary: a memfd is a new, unmeasured inode
    r = tp.sh(f"{lab.helper} memfd {lab.true}; echo rc=$?")
    assert r.stdout.strip() == KILLED
    [v] = _violations(tp, "exec")
    assert v.subject.startswith("/dev/fd/")  # execveat(memfd, "", AT_EMPTY_PATH): the only name there is
    assert v.detail["why"] == "unmeasured" and v.detail["action"] == "killed"


def test_hard_link_to_untrusted_file_under_a_trusted_name_is_caught(lab, tmp_path) -> None:
    good = tmp_path / "tool"
    shutil.copy2("/usr/bin/true", good)
    # a second name for the trusted inode, made before measurement (a new link changes the ctime)
    os.link(good, tmp_path / "alias")
    tp = lab.label(trusted=[str(good)])
    assert tp.sh(f"{good}; echo rc=$?").stdout.strip() == "rc=0"
    # trust follows the inode, not the name
    assert tp.sh(f"{tmp_path / 'alias'}; echo rc=$?").stdout.strip() == "rc=0"
    # the trusted name now points at the untrusted inode
    os.link(lab.untrusted, tmp_path / "tool.new")
    os.replace(tmp_path / "tool.new", good)
    assert tp.sh(f"{good}; echo rc=$?").stdout.strip() == KILLED
    [v] = _violations(tp, "exec")
    assert v.subject == str(good) and v.detail["ino"] == os.stat(lab.untrusted).st_ino


def test_trusted_file_modified_after_measurement_is_caught(lab, tmp_path) -> None:
    tool = tmp_path / "tool"
    shutil.copy2("/usr/bin/true", tool)
    tp = lab.label(trusted=[str(tool)])
    assert tp.sh(f"{tool}; echo rc=$?").stdout.strip() == "rc=0"
    with open(tool, "r+b") as f:  # rewrite one byte with itself: same content, new ctime
        b = f.read(1)
        f.seek(0)
        f.write(b)
    assert tp.sh(f"{tool}; echo rc=$?").stdout.strip() == KILLED
    [v] = _violations(tp, "exec")
    assert v.detail["why"] == "changed-after-measurement"


def test_copy_of_trusted_binary_on_tmpfs_is_killed(lab, tmp_path) -> None:
    """A copy is a new inode on another device: unmeasured until the DB measures it, whatever its content."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "cwlite-test", str(mnt)], check=True)
    try:
        shutil.copy2(lab.true, mnt / "true")
        tp = lab.label()
        assert tp.sh(f"{mnt / 'true'}; echo rc=$?").stdout.strip() == KILLED
        [v] = _violations(tp, "exec")
        assert v.detail["why"] == "unmeasured" and v.detail["dev"] != os.stat(lab.true).st_dev
        # once measured where it is, the same bytes are trusted
        tp2 = lab.label(trusted=[str(mnt / "true")])
        assert tp2.sh(f"{mnt / 'true'}; echo rc=$?").stdout.strip() == "rc=0"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_interpreter_running_unmeasured_script_is_not_seen(lab, tmp_path) -> None:
    """The tracepoint backend sees code that is exec'd or mapped executable, not data an interpreter reads."""
    script = tmp_path / "job.sh"
    script.write_text(f"#!{lab.shell}\necho from-script\n")
    script.chmod(0o755)
    tp = lab.label()
    r = tp.sh(f"{lab.shell} {script}; {script}; echo rc=$?")
    assert r.stdout.split() == ["from-script", "from-script", "rc=0"]
    assert not tp.events(EventKind.VIOLATION, timeout=0.3)
    # the #! exec is judged by its interpreter's inode (trusted; same measurement as the entrypoint, so
    # no second trusted-load event); the script's path is all the hook gets, its inode is never judged
    assert tp.events(EventKind.LABEL_TRANSITION)[0].subject == tp.entrypoint


def test_untrusted_mprotect_exec_of_a_file_is_caught(lab) -> None:
    tp = lab.label(anon_exec="allow")
    assert tp.sh(f"{lab.helper} mprotect {lab.true}; echo rc=$?").stdout.split() == ["mapped", "rc=0"]
    r = tp.sh(f"{lab.helper} mprotect {lab.untrusted}; echo rc=$?")
    assert r.stdout.strip() == KILLED
    [v] = _violations(tp, "mprotect")
    assert v.detail["ino"] == os.stat(lab.untrusted).st_ino and v.subject == lab.untrusted


def test_read_implies_exec_personality_is_judged_as_exec(lab) -> None:
    tp = lab.label()
    r = tp.sh(f"{lab.helper} rie-mmap {lab.untrusted}; echo rc=$?")
    assert r.stdout.strip() == KILLED
    [v] = _violations(tp, "mmap")
    assert v.detail["ino"] == os.stat(lab.untrusted).st_ino


def test_anonymous_exec_memory_follows_the_label_rule(lab) -> None:
    strict = lab.label(anon_exec="violation")
    assert strict.sh(f"{lab.helper} anon; echo rc=$?").stdout.strip() == KILLED
    assert strict.sh(f"{lab.helper} anon-mprotect; echo rc=$?").stdout.strip() == KILLED
    assert strict.sh(f"{lab.helper} shm-exec; echo rc=$?").stdout.strip() == KILLED
    assert {e.op for e in strict.events(EventKind.VIOLATION)} >= {"anon-exec"}
    assert _violations(strict, "mprotect")[0].detail["why"] == "anonymous-exec"
    jit = lab.label(anon_exec="allow")
    assert jit.sh(f"{lab.helper} anon; {lab.helper} anon-mprotect; {lab.helper} shm-exec; echo rc=$?").stdout.split() == \
        ["anon", "anon", "anon", "rc=0"]
    assert not jit.events(EventKind.VIOLATION, timeout=0.3)


def test_audit_mode_logs_and_lets_run(lab) -> None:
    tp = lab.label(mode="audit")
    assert tp.sh(f"{lab.untrusted}; echo rc=$?").stdout.strip() == "rc=0"
    [v] = _violations(tp, "exec")
    assert v.detail["action"] == "allowed"


def test_on_exec_drop_leaves_the_label(lab) -> None:
    tp = lab.label(on_exec="drop")
    assert tp.sh(f"{lab.untrusted}; echo rc=$?").stdout.strip() == "rc=0"
    drops = tp.events(EventKind.LABEL_TRANSITION, op="drop")
    assert drops and drops[0].subject == lab.untrusted
    assert not tp.events(EventKind.VIOLATION, timeout=0.2)


def test_unlabelled_processes_are_never_affected(lab) -> None:
    lab.label(anon_exec="violation")
    before = len(lab.collect(100))
    for argv in ([lab.untrusted], [LDSO, lab.untrusted], [lab.helper, "memfd", lab.untrusted],
                 [lab.helper, "mmap", lab.untrusted], [lab.helper, "mprotect", lab.untrusted], [lab.helper, "anon"],
                 [lab.helper, "shm-exec"], [lab.helper, "rie-mmap", lab.untrusted]):
        assert subprocess.run(argv, capture_output=True).returncode == 0, argv
    lab.collect(200)
    assert [e for e in lab.events[before:] if e.kind is EventKind.VIOLATION] == []


def test_reload_swaps_trust_without_losing_labels(lab, tmp_path) -> None:
    tool = tmp_path / "tool"
    shutil.copy2("/usr/bin/true", tool)
    tp = lab.label(trusted=[str(tool)])
    # a long-lived labelled shell: reads commands from a pipe across the reload
    sh = subprocess.Popen([tp.entrypoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        sh.stdin.write(f"{tool}; echo rc=$?\n")
        sh.stdin.flush()
        assert sh.stdout.readline().strip() == "rc=0"
        assert labelled_processes(lab.engine).get(sh.pid) == tp.name
        policy, entries = lab._policy_and_entries(tp.name, tp.entrypoint)  # same label, tool no longer trusted
        lab.engine.reload(policy, entries)
        assert labelled_processes(lab.engine).get(sh.pid) == tp.name
        sh.stdin.write(f"{tool}; echo rc=$?\n")
        sh.stdin.flush()
        assert sh.stdout.readline().strip() == KILLED
    finally:
        sh.stdin.close()
        sh.wait(10)
    assert _violations(tp, "exec")[0].subject == str(tool)


def test_labels_do_not_leak_after_many_short_processes(lab) -> None:
    tp = lab.label()
    baseline = len(labelled_processes(lab.engine))
    r = tp.sh("i=0; while [ $i -lt 2000 ]; do /usr/bin/true; i=$((i+1)); done; echo done", timeout=120)
    assert r.stdout.strip() == "done"
    assert len(labelled_processes(lab.engine)) == baseline


def test_lost_events_are_reported(tmp_path) -> None:
    small = Lab(tmp_path, ringbuf_pages=1)  # 4 KiB: ~17 records
    try:
        tp = small.label(mode="audit")
        small.engine.poll(0)
        # 60 violations while nobody reads the ring buffer
        assert tp.sh(f"for i in $(seq 60); do {small.untrusted}; done; echo done").stdout.strip() == "done"
        events = small.engine.poll(100)
        lost = [e for e in events if e.kind is EventKind.LOST_EVENTS]
        assert lost and lost[0].detail["ringbuf"] > 0
        seen = sum(1 for e in events if e.kind is EventKind.VIOLATION)
        assert seen < 60 and seen + lost[0].detail["ringbuf"] >= 60  # lost records include some violations
    finally:
        small.close()


def test_records_read_at_detach_are_kept_before_daemon_stop(tmp_path) -> None:
    """close() reads what is left in the ring buffer and keeps it for drain(): once it was read and
    thrown away, so the log lost whatever happened in the last moment before a SIGTERM."""
    lab = Lab(tmp_path)
    try:
        tp = lab.label()
        lab.collect(100)  # the reload's own events
        assert tp.sh(f"{lab.untrusted}; echo rc=$?").stdout.strip() == KILLED
    finally:
        lab.close()  # nothing polled since the kill
    tail = lab.engine.drain()
    assert [(e.kind, e.op) for e in tail if e.label == tp.name] == [
        (EventKind.LABEL_TRANSITION, "exec"), (EventKind.TRUSTED_LOAD, "exec"), (EventKind.TRUSTED_LOAD, "interp"),
        (EventKind.TRUSTED_LOAD, "mmap"), (EventKind.VIOLATION, "exec")]
    assert tail[-1].kind is EventKind.DAEMON_STOP


def test_no_unenforced_window_across_reloads(lab) -> None:
    """A labelled loop execs an untrusted binary while the engine reloads 20 times: every exec dies.
    (A reload waits one RCU grace period per generation slot it replaces, tens of ms: the loop is
    long enough for several.)"""
    tp = lab.label()
    loop = subprocess.Popen([tp.entrypoint, "-c", f"i=0; while [ $i -lt 1000 ]; do {lab.untrusted}; echo $?; i=$((i+1)); done"],
                            stdout=subprocess.PIPE, text=True)
    policy, entries = lab._policy_and_entries(tp.name, tp.entrypoint)
    reloads = 0
    while loop.poll() is None and reloads < 20:
        lab.engine.reload(policy, entries)
        reloads += 1
    out = loop.communicate(timeout=120)[0].split()
    assert reloads >= 5 and out == ["137"] * 1000


def test_modified_entrypoint_gives_no_label(lab) -> None:
    tp = lab.label()
    with open(tp.entrypoint, "r+b") as f:  # same bytes, new ctime: the entrypoint is no longer the measured file
        b = f.read(1)
        f.seek(0)
        f.write(b)
    r = tp.sh(f"{lab.untrusted}; echo rc=$?")
    assert r.stdout.strip() == "rc=0"  # runs, but unlabelled: nothing it does is a TP's
    [v] = tp.events(EventKind.VIOLATION, op="entrypoint")
    assert v.detail["why"] == "changed-after-measurement" and v.detail["action"] == "allowed"
    assert not tp.events(EventKind.LABEL_TRANSITION, timeout=0.2)
