"""The PRIMA bypass suite, each attack written once: real processes under a label, real kills or denials, real events.

Each scenario enters a fresh label through a test-local entrypoint (a copy of
/bin/sh), tries one way of running code, and asserts the outcome its backend
gives (tests/bypass/backend.py: killed with status 137, or EPERM) and the
event the engine produced from the ring buffer.

A tier runs the suite by subclassing `BypassScenarios` with its backend:
tests/kernel/test_prima_bypass.py (tracepoint, host kernel) and
tests/vm/guest/test_lsm_prima.py (lsm, in the VM); scenarios that exist on one
backend only live there. New attacks go here, once (content-change attacks: content.py).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from controlplane.core.events import EventKind
from tests.bypass.backend import Backend
from tests.bypass.content import ContentScenarios
from tests.bypass.lab import LDSO, Lab, OnLab


class BypassScenarios(ContentScenarios, OnLab):
    """Every bypass attempt, against the class's `backend`."""

    backend: Backend

    @pytest.fixture
    def tmpfs(self, tmp_path: Path):
        """A fresh tmpfs: a real local filesystem (in the VM, with stable (dev, ino), unlike 9p or /tmp's overlay)."""
        mnt = tmp_path / "tmpfs"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "cwlite-test", str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=True)

    def test_trusted_binary_runs_and_entry_is_logged(self, lab: Lab) -> None:
        tp = lab.label()
        r = tp.sh("/usr/bin/true; echo rc=$?")
        assert r.stdout.strip() == "rc=0", r.stderr
        [enter] = tp.events(EventKind.LABEL_TRANSITION)
        assert enter.subject == tp.entrypoint and enter.detail["from"] == "" and len(enter.digest) == 32
        assert enter.detail["backend"] == self.backend.name
        loads = tp.events(EventKind.TRUSTED_LOAD)
        assert {tp.entrypoint, lab.true, os.path.realpath(LDSO)} <= {e.subject for e in loads}
        true_load = next(e for e in loads if e.subject == lab.true)
        assert true_load.op == "exec" and true_load.digest == hashlib.sha256(open(lab.true, "rb").read()).digest()
        assert not tp.violations(timeout=0.2)

    def test_first_trusted_load_per_label_only(self, lab: Lab) -> None:
        tp = lab.label()
        assert tp.sh("/usr/bin/true; /usr/bin/true; /usr/bin/true; echo ok").stdout.strip() == "ok"
        tp.events(EventKind.TRUSTED_LOAD)
        lab.collect(200)
        assert sum(1 for e in lab.events if e.label == tp.name and e.subject == lab.true and e.op == "exec") == 1

    def test_untrusted_binary_is_stopped_before_it_runs_and_the_caller_lives(self, lab: Lab) -> None:
        expect = self.backend.expect
        tp = lab.label()
        r = tp.sh(f"{lab.untrusted}; echo rc=$?; echo still-here")
        assert r.stdout.split() == [expect.rc(if_denied=126), "still-here"]  # 126: the shell's "cannot execute"
        expect.reported(r.stderr)
        [v] = tp.violations("exec")
        assert v.subject == lab.untrusted and v.detail["action"] == expect.action and v.detail["why"] == "unmeasured"

    def test_direct_loader_exec_is_caught_at_the_executable_mmap(self, lab: Lab) -> None:
        expect = self.backend.expect
        tp = lab.label()
        r = tp.sh(f"{LDSO} {lab.untrusted}; echo rc=$?")
        assert r.stdout.strip() == expect.rc(if_denied=127), r.stderr
        expect.reported(r.stderr, "failed to map segment")
        [v] = tp.violations("mmap")
        assert v.subject == self.backend.mapped_name(lab.untrusted) and v.detail["action"] == expect.action
        assert v.detail["ino"] == os.stat(lab.untrusted).st_ino
        assert not tp.violations("exec")  # ld.so itself is trusted: its exec was not the violation

    @pytest.mark.parametrize("call", ["mmap", "mprotect"])
    def test_untrusted_file_made_executable_is_stopped(self, lab: Lab, call: str) -> None:
        """mmap(PROT_EXEC) of a file, or mprotect adding PROT_EXEC to its (unwritten) mapping."""
        expect = self.backend.expect
        tp = lab.label(anon_exec="allow")
        assert tp.sh(f"{lab.helper} {call} {lab.true}; echo rc=$?").stdout.split() == ["mapped", "rc=0"]
        r = tp.sh(f"{lab.helper} {call} {lab.untrusted}; echo rc=$?")
        assert r.stdout.split() == [expect.rc(if_denied=3)]
        expect.reported(r.stderr, prefix=f"{call}:")
        [v] = tp.violations(call)
        assert v.detail["ino"] == os.stat(lab.untrusted).st_ino and v.subject == self.backend.mapped_name(lab.untrusted)
        assert v.detail["action"] == expect.action and v.detail["why"] == "unmeasured"

    def test_read_implies_exec_personality_is_judged_as_exec(self, lab: Lab) -> None:
        """READ_IMPLIES_EXEC: the kernel turns mmap(PROT_READ) into PROT_EXEC, and so must PRIMA."""
        expect = self.backend.expect
        tp = lab.label()
        r = tp.sh(f"{lab.helper} rie-mmap {lab.untrusted}; echo rc=$?")
        assert r.stdout.split() == [expect.rc(if_denied=3)]
        expect.reported(r.stderr, prefix="mmap:")
        [v] = tp.violations("mmap")
        assert v.detail["ino"] == os.stat(lab.untrusted).st_ino and v.detail["action"] == expect.action

    def test_memfd_fexecve_is_caught(self, lab: Lab) -> None:
        expect = self.backend.expect
        tp = lab.label()
        # even with the content of a trusted binary: a memfd is a new, unmeasured inode
        r = tp.sh(f"{lab.helper} memfd {lab.true}; echo rc=$?")
        assert r.stdout.strip() == expect.rc(if_denied=3)
        expect.reported(r.stderr, prefix="fexecve:")
        [v] = tp.violations("exec")
        # execveat(memfd, "", AT_EMPTY_PATH): the only name there is
        assert v.subject.startswith("/dev/fd/") and v.detail["name"].startswith("/dev/fd/")
        assert v.detail["why"] == "unmeasured" and v.detail["action"] == expect.action

    def test_hard_link_to_untrusted_file_under_a_trusted_name_is_caught(self, lab: Lab, tmp_path: Path) -> None:
        expect = self.backend.expect
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
        r = tp.sh(f"{good}; echo rc=$?")
        assert r.stdout.strip() == expect.rc(if_denied=126)
        expect.reported(r.stderr)
        [v] = tp.violations("exec")
        assert v.subject == str(good) and v.detail["ino"] == os.stat(lab.untrusted).st_ino

    def test_trusted_file_modified_after_measurement_is_caught(self, lab: Lab, tmp_path: Path) -> None:
        expect = self.backend.expect
        tool = tmp_path / "tool"
        shutil.copy2("/usr/bin/true", tool)
        tp = lab.label(trusted=[str(tool)])
        assert tp.sh(f"{tool}; echo rc=$?").stdout.strip() == "rc=0"
        with open(tool, "r+b") as f:  # rewrite one byte with itself: same content, new ctime
            b = f.read(1)
            f.seek(0)
            f.write(b)
        r = tp.sh(f"{tool}; echo rc=$?")
        assert r.stdout.strip() == expect.rc(if_denied=126)
        expect.reported(r.stderr)
        [v] = tp.violations("exec")
        assert v.detail["why"] == "changed-after-measurement"

    def test_copy_of_trusted_binary_on_tmpfs_is_stopped_until_measured(self, lab: Lab, tmpfs: Path) -> None:
        """A copy is a new inode on another device: unmeasured until the DB measures it, whatever its content."""
        expect = self.backend.expect
        shutil.copy2(lab.true, tmpfs / "true")
        tp = lab.label()
        r = tp.sh(f"{tmpfs / 'true'}; echo rc=$?")
        assert r.stdout.strip() == expect.rc(if_denied=126)
        expect.reported(r.stderr)
        [v] = tp.violations("exec")
        assert v.detail["why"] == "unmeasured" and v.detail["dev"] != os.stat(lab.true).st_dev
        # once measured where it is, the same bytes are trusted
        tp2 = lab.label(trusted=[str(tmpfs / "true")])
        assert tp2.sh(f"{tmpfs / 'true'}; echo rc=$?").stdout.strip() == "rc=0"

    def test_script_given_to_an_interpreter_is_not_seen(self, lab: Lab, tmp_path: Path) -> None:
        """Both backends see code that is exec'd or mapped executable, not data an interpreter reads."""
        script = tmp_path / "job.sh"
        script.write_text("echo from-script\n")
        tp = lab.label()
        assert tp.sh(f"{lab.shell} {script}; echo rc=$?").stdout.split() == ["from-script", "rc=0"]
        assert not tp.violations(timeout=0.3)

    def test_anonymous_exec_memory_follows_the_label_rule(self, lab: Lab) -> None:
        expect = self.backend.expect
        strict = lab.label(anon_exec="violation")
        r = strict.sh(f"{lab.helper} anon; echo rc=$?")
        assert r.stdout.split() == [expect.rc(if_denied=3)]
        expect.reported(r.stderr, prefix="mmap:")  # mmap(PROT_EXEC|MAP_ANONYMOUS)
        r = strict.sh(f"{lab.helper} anon-mprotect; echo rc=$?")
        assert r.stdout.split() == [expect.rc(if_denied=3)]
        expect.reported(r.stderr, prefix="mprotect:")  # mprotect(PROT_EXEC) of anonymous memory
        assert {e.op for e in strict.violations()} >= {"anon-exec", "mprotect"}
        assert strict.violations("mprotect")[0].detail["why"] == "anonymous-exec"
        jit = lab.label(anon_exec="allow")
        assert jit.sh(f"{lab.helper} anon; {lab.helper} anon-mprotect; echo rc=$?").stdout.split() == ["anon", "anon", "rc=0"]
        assert not jit.violations(timeout=0.3)

    def test_audit_mode_logs_and_lets_run(self, lab: Lab) -> None:
        tp = lab.label(mode="audit")
        assert tp.sh(f"{lab.untrusted}; echo rc=$?").stdout.strip() == "rc=0"
        assert tp.sh(f"{lab.helper} mmap {lab.untrusted}; echo rc=$?").stdout.split() == ["mapped", "rc=0"]
        [v] = tp.violations("exec")
        assert v.detail["action"] == "allowed" and v.detail["why"] == "unmeasured"
        # every executable mapping of the untrusted file is logged, none stopped
        maps = tp.violations("mmap")
        assert maps and all(m.detail["action"] == "allowed" and m.detail["ino"] == os.stat(lab.untrusted).st_ino
                            for m in maps)

    def test_on_exec_drop_leaves_the_label(self, lab: Lab) -> None:
        tp = lab.label(on_exec="drop")
        assert tp.sh(f"{lab.untrusted}; echo rc=$?").stdout.strip() == "rc=0"
        drops = tp.events(EventKind.LABEL_TRANSITION, op="drop")
        assert drops and drops[0].subject == lab.untrusted
        assert not tp.violations(timeout=0.2)

    def test_unlabelled_processes_are_never_affected(self, lab: Lab) -> None:
        lab.label(anon_exec="violation")
        before = len(lab.collect(100))
        for argv in ([lab.untrusted], [LDSO, lab.untrusted], [lab.helper, "memfd", lab.untrusted],
                     [lab.helper, "mmap", lab.untrusted], [lab.helper, "mprotect", lab.untrusted], [lab.helper, "anon"],
                     [lab.helper, "anon-mprotect"], [lab.helper, "shm-exec"], [lab.helper, "rie-mmap", lab.untrusted]):
            assert subprocess.run(argv, capture_output=True).returncode == 0, argv
        lab.collect(200)
        assert [e for e in lab.events[before:] if e.kind is EventKind.VIOLATION] == []

    def test_reload_swaps_trust_and_running_tasks_keep_their_label(self, lab: Lab, tmp_path: Path) -> None:
        expect = self.backend.expect
        tool = tmp_path / "tool"
        shutil.copy2("/usr/bin/true", tool)
        tp = lab.label(trusted=[str(tool)])
        # a long-lived labelled shell: reads commands from a pipe across the reload
        sh = subprocess.Popen([tp.entrypoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        try:
            sh.stdin.write(f"{tool}; echo rc=$?\n")
            sh.stdin.flush()
            assert sh.stdout.readline().strip() == "rc=0"
            if self.backend.labels_listable:
                assert lab.labelled_processes().get(sh.pid) == tp.name
            lab.reload(tp)  # same label, tool no longer trusted
            if self.backend.labels_listable:
                assert lab.labelled_processes().get(sh.pid) == tp.name
            sh.stdin.write(f"{tool}; echo rc=$?\n")
            sh.stdin.flush()
            assert sh.stdout.readline().strip() == expect.rc(if_denied=126)  # and the labelled shell still runs
        finally:
            sh.stdin.close()
            sh.wait(10)
        expect.reported(sh.stderr.read())
        assert tp.violations("exec")[0].subject == str(tool)

    def test_no_unenforced_window_across_reloads(self, lab: Lab) -> None:
        """A labelled shell execs an untrusted binary, step by step, while the engine reloads 20 times:
        every exec is stopped. Each reload runs in a thread while the shell execs (at least once, at most
        25 times per reload: bounded, whatever the speed of the machine and of a reload)."""
        tp = lab.label()
        loop = subprocess.Popen([tp.entrypoint, "-c", f"while read _; do {lab.untrusted}; echo rc=$?; done"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        policy, entries = lab.policy_for(tp)
        out: list[str] = []
        failures: list[BaseException] = []

        def reload() -> None:
            try:
                lab.engine.reload(policy, entries)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        try:
            for _ in range(20):
                worker = threading.Thread(target=reload)
                worker.start()
                n = 0
                while n == 0 or (worker.is_alive() and n < 25):
                    loop.stdin.write("x\n")
                    loop.stdin.flush()
                    out.append(loop.stdout.readline().strip())
                    n += 1
                worker.join()
        finally:
            loop.stdin.close()
            loop.wait(60)
        assert not failures, failures
        assert len(out) >= 20 and out == [self.backend.expect.rc(if_denied=126)] * len(out)

    def test_modified_entrypoint_gives_no_label(self, lab: Lab) -> None:
        tp = lab.label()
        with open(tp.entrypoint, "r+b") as f:  # same bytes, new ctime: the entrypoint is no longer the measured file
            b = f.read(1)
            f.seek(0)
            f.write(b)
        r = tp.sh(f"{lab.untrusted}; echo rc=$?")
        assert r.stdout.strip() == "rc=0"  # runs, but unlabelled: nothing it does is a TP's
        [v] = tp.violations("entrypoint")
        assert v.detail["why"] == "changed-after-measurement" and v.detail["action"] == "allowed"
        assert not tp.events(EventKind.LABEL_TRANSITION, timeout=0.2)
