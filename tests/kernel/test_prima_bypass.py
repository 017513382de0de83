"""The PRIMA bypass suite (tests/bypass/scenarios.py) on the host kernel: the tracepoint backend kills.

Plus what only the tracepoint backend has: its hook sees a #! script's
interpreter and not the script, it reads SysV shared memory attached
executable as anonymous memory, and it keeps labels in a tgid map user space
can list; and the scenarios that need an engine of their own (a compile each,
minutes in the VM).
"""
from __future__ import annotations

from pathlib import Path

from controlplane.core.events import EventKind
from tests.bypass.backend import TRACEPOINT
from tests.bypass.lab import Lab
from tests.bypass.scenarios import BypassScenarios

pytestmark = list(TRACEPOINT.marks)


class TestTracepoint(BypassScenarios):
    backend = TRACEPOINT

    def test_hashbang_script_is_judged_by_its_interpreter(self, lab: Lab, tmp_path: Path) -> None:
        """sched_process_exec reports the #! exec as its interpreter's: the script's path is all the
        hook gets, its inode is never judged (the lsm backend judges the script itself)."""
        script = tmp_path / "job.sh"
        script.write_text(f"#!{lab.shell}\necho from-script\n")
        script.chmod(0o755)
        tp = lab.label()
        assert tp.sh(f"{script}; echo rc=$?").stdout.split() == ["from-script", "rc=0"]
        assert not tp.violations(timeout=0.3)
        # the interpreter is trusted, with the entrypoint's measurement: no second trusted-load event
        assert tp.events(EventKind.LABEL_TRANSITION)[0].subject == tp.entrypoint

    def test_sysv_shm_exec_follows_the_anon_exec_rule(self, lab: Lab) -> None:
        """shmat(SHM_EXEC) is anonymous memory to PRIMA (sys_enter_shmat)."""
        strict = lab.label(anon_exec="violation")
        assert strict.sh(f"{lab.helper} shm-exec; echo rc=$?").stdout.strip() == "rc=137"
        [v] = strict.violations("anon-exec")
        assert v.detail["why"] == "anonymous-exec" and v.detail["action"] == "killed"
        jit = lab.label(anon_exec="allow")
        assert jit.sh(f"{lab.helper} shm-exec; echo rc=$?").stdout.split() == ["anon", "rc=0"]
        assert not jit.violations(timeout=0.3)

    def test_labels_do_not_leak_after_many_short_processes(self, lab: Lab) -> None:
        tp = lab.label()
        baseline = len(lab.labelled_processes())
        r = tp.sh("i=0; while [ $i -lt 2000 ]; do /usr/bin/true; i=$((i+1)); done; echo done", timeout=120)
        assert r.stdout.strip() == "done"
        assert len(lab.labelled_processes()) == baseline

    def test_lost_events_are_reported(self, tmp_path: Path) -> None:
        """Ring-buffer loss is counted by code both backends share (cwl_emit, cwl_drops); it passed on lsm
        too, but a second engine costs minutes in the loaded VM, so it runs here only."""
        small = Lab(tmp_path, backend=self.backend.name, ringbuf_pages=1)  # 4 KiB: ~17 records
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

    def test_records_read_at_detach_are_kept_before_daemon_stop(self, tmp_path: Path) -> None:
        """close() reads what is left in the ring buffer and keeps it for drain(): once it was read and
        thrown away, so the log lost whatever happened in the last moment before a SIGTERM."""
        lab = Lab(tmp_path, backend=self.backend.name)
        try:
            tp = lab.label()
            lab.collect(100)  # the reload's own events
            assert tp.sh(f"{lab.untrusted}; echo rc=$?").stdout.strip() == "rc=137"
        finally:
            lab.close()  # nothing polled since the kill
        tail = lab.engine.drain()
        assert [(e.kind, e.op) for e in tail if e.label == tp.name] == [
            (EventKind.LABEL_TRANSITION, "exec"), (EventKind.TRUSTED_LOAD, "exec"), (EventKind.TRUSTED_LOAD, "interp"),
            (EventKind.TRUSTED_LOAD, "mmap"), (EventKind.VIOLATION, "exec")]
        assert tail[-1].kind is EventKind.DAEMON_STOP
