"""The PRIMA bypass suite under the `lsm` backend, in the VM: each attempt fails with EPERM from its syscall.

The same lab as the tracepoint suite (tests/kernel/prima_lab.py: test-local
entrypoints that are copies of /bin/sh, a helper that loads code each way an
attacker would), with the engine on exec.bpf.c's lsm backend. Where the tracepoint
backend kills the process (status 137), here the syscall returns EPERM
("Operation not permitted" from the shell or the helper's perror) and the
process lives on; every attempt is a `denied` violation event.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from controlplane.core.events import EventKind
from tests.kernel.prima_lab import LDSO

EPERM_TEXT = os.strerror(1)  # "Operation not permitted": EACCES would read "Permission denied"


@pytest.fixture(scope="module")
def lab(lsm_lab):
    return lsm_lab


def _violations(label, op):
    return label.events(EventKind.VIOLATION, op=op)


def _denied(r: subprocess.CompletedProcess, what: str) -> None:
    assert EPERM_TEXT in r.stderr, f"{what}: stderr {r.stderr!r}, stdout {r.stdout!r}"


def test_trusted_binary_runs_and_entry_is_logged(lab) -> None:
    tp = lab.label()
    r = tp.sh("/usr/bin/true; echo rc=$?")
    assert r.stdout.strip() == "rc=0", r.stderr
    [enter] = tp.events(EventKind.LABEL_TRANSITION)
    assert enter.subject == tp.entrypoint and enter.detail["from"] == "" and enter.detail["backend"] == "lsm"
    loads = tp.events(EventKind.TRUSTED_LOAD)
    assert {tp.entrypoint, lab.true, os.path.realpath(LDSO)} <= {e.subject for e in loads}
    true_load = next(e for e in loads if e.subject == lab.true)
    assert true_load.op == "exec" and true_load.digest == hashlib.sha256(open(lab.true, "rb").read()).digest()
    assert not tp.events(EventKind.VIOLATION, timeout=0.2)


def test_untrusted_binary_exec_fails_with_eperm_and_the_caller_lives(lab) -> None:
    tp = lab.label()
    r = tp.sh(f"{lab.untrusted}; echo rc=$?; echo still-here")
    _denied(r, "exec")
    assert r.stdout.split() == ["rc=126", "still-here"]  # the shell's "cannot execute", not a kill
    [v] = _violations(tp, "exec")
    assert v.subject == lab.untrusted and v.detail["action"] == "denied" and v.detail["why"] == "unmeasured"


def test_direct_loader_exec_is_denied_at_the_executable_mmap(lab) -> None:
    tp = lab.label()
    r = tp.sh(f"{LDSO} {lab.untrusted}; echo rc=$?")
    assert "failed to map segment" in r.stderr and r.stdout.strip() == "rc=127", r.stderr
    [v] = _violations(tp, "mmap")
    assert v.subject == os.path.basename(lab.untrusted) and v.detail["action"] == "denied"
    assert v.detail["ino"] == os.stat(lab.untrusted).st_ino
    assert not _violations(tp, "exec")  # ld.so itself is trusted


@pytest.mark.parametrize("call", ["mmap", "mprotect"])
def test_untrusted_file_made_executable_fails_with_eperm(lab, call) -> None:
    """mmap(PROT_EXEC) of a file, or mprotect adding PROT_EXEC to its (unwritten) mapping."""
    tp = lab.label(anon_exec="allow")
    assert tp.sh(f"{lab.helper} {call} {lab.true}; echo rc=$?").stdout.split() == ["mapped", "rc=0"]
    r = tp.sh(f"{lab.helper} {call} {lab.untrusted}; echo rc=$?")
    _denied(r, call)
    assert r.stderr.startswith(f"{call}:") and r.stdout.strip() == "rc=3"
    [v] = _violations(tp, call)
    assert v.detail["ino"] == os.stat(lab.untrusted).st_ino and v.detail["action"] == "denied"
    assert v.detail["why"] == "unmeasured"


def test_memfd_fexecve_fails_with_eperm(lab) -> None:
    tp = lab.label()
    r = tp.sh(f"{lab.helper} memfd {lab.true}; echo rc=$?")
    _denied(r, "fexecve")
    assert r.stderr.startswith("fexecve:") and r.stdout.strip() == "rc=3"
    [v] = _violations(tp, "exec")
    assert v.detail["name"].startswith("/dev/fd/") and v.detail["why"] == "unmeasured"


def test_hard_link_to_untrusted_file_under_a_trusted_name_is_denied(lab, tmp_path) -> None:
    good = tmp_path / "tool"
    shutil.copy2("/usr/bin/true", good)
    os.link(good, tmp_path / "alias")
    tp = lab.label(trusted=[str(good)])
    assert tp.sh(f"{good}; echo rc=$?").stdout.strip() == "rc=0"
    assert tp.sh(f"{tmp_path / 'alias'}; echo rc=$?").stdout.strip() == "rc=0"
    os.link(lab.untrusted, tmp_path / "tool.new")
    os.replace(tmp_path / "tool.new", good)
    r = tp.sh(f"{good}; echo rc=$?")
    _denied(r, "exec via the trusted name")
    [v] = _violations(tp, "exec")
    assert v.subject == str(good) and v.detail["ino"] == os.stat(lab.untrusted).st_ino


def test_trusted_file_modified_after_measurement_is_denied(lab, tmp_path) -> None:
    tool = tmp_path / "tool"
    shutil.copy2("/usr/bin/true", tool)
    tp = lab.label(trusted=[str(tool)])
    assert tp.sh(f"{tool}; echo rc=$?").stdout.strip() == "rc=0"
    with open(tool, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(b)
    r = tp.sh(f"{tool}; echo rc=$?")
    _denied(r, "exec of a changed file")
    [v] = _violations(tp, "exec")
    assert v.detail["why"] == "changed-after-measurement"


def test_copy_of_trusted_binary_on_tmpfs_is_denied_until_measured(lab, tmpfs) -> None:
    shutil.copy2(lab.true, tmpfs / "true")
    tp = lab.label()
    _denied(tp.sh(f"{tmpfs / 'true'}; echo rc=$?"), "exec of an unmeasured copy")
    [v] = _violations(tp, "exec")
    assert v.detail["why"] == "unmeasured" and v.detail["dev"] != os.stat(lab.true).st_dev
    tp2 = lab.label(trusted=[str(tmpfs / "true")])
    assert tp2.sh(f"{tmpfs / 'true'}; echo rc=$?").stdout.strip() == "rc=0"


def test_unmeasured_script_exec_is_denied_but_interpreter_input_is_not_seen(lab, tmp_path) -> None:
    """bprm_check_security sees the #! script itself (the tracepoint backend sees only its interpreter);
    a script handed to an interpreter as data is still invisible to both."""
    script = tmp_path / "job.sh"
    script.write_text(f"#!{lab.shell}\necho from-script\n")
    script.chmod(0o755)
    tp = lab.label()
    r = tp.sh(f"{lab.shell} {script}; {script}; echo rc=$?")
    assert r.stdout.split() == ["from-script", "rc=126"]
    _denied(r, "exec of the script")
    [v] = _violations(tp, "exec")
    assert v.subject == str(script) and v.detail["why"] == "unmeasured"
    ok = lab.label(trusted=[str(script)])
    assert ok.sh(f"{script}; echo rc=$?").stdout.split() == ["from-script", "rc=0"]


def test_anonymous_exec_memory_follows_the_label_rule(lab) -> None:
    strict = lab.label(anon_exec="violation")
    r = strict.sh(f"{lab.helper} anon; echo rc=$?")
    _denied(r, "mmap(PROT_EXEC|MAP_ANONYMOUS)")
    r = strict.sh(f"{lab.helper} anon-mprotect; echo rc=$?")
    _denied(r, "mprotect(PROT_EXEC) of anonymous memory")
    assert {e.op for e in strict.events(EventKind.VIOLATION)} >= {"anon-exec", "mprotect"}
    assert _violations(strict, "mprotect")[0].detail["why"] == "anonymous-exec"
    jit = lab.label(anon_exec="allow")
    assert jit.sh(f"{lab.helper} anon; {lab.helper} anon-mprotect; echo rc=$?").stdout.split() == ["anon", "anon", "rc=0"]
    assert not jit.events(EventKind.VIOLATION, timeout=0.3)


WRITABLE_CODE_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
/* Code that is not the measured file although it maps one: "wx" maps it private, writable and
 * executable; "cow" writes to a private mapping (its page becomes the task's copy), then
 * mprotects it executable. */
int main(int argc, char **argv)
{
	int fd = open(argv[2], O_RDONLY);
	if (fd < 0) { perror("open"); return 3; }
	if (!strcmp(argv[1], "wx")) {
		if (mmap(0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED) { perror("mmap"); return 3; }
	} else {
		volatile char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) { perror("mmap"); return 3; }
		p[0] = p[0];
		if (mprotect((void *)p, 4096, PROT_READ | PROT_EXEC)) { perror("mprotect"); return 3; }
	}
	puts("mapped");
	return 0;
}
"""


@pytest.fixture(scope="module")
def writable_code(lab, tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("wx") / "wx.c"
    src.write_text(WRITABLE_CODE_C)
    subprocess.run(["gcc", "-O2", "-o", str(src.with_suffix("")), str(src)], check=True)
    return str(src.with_suffix(""))


@pytest.mark.parametrize("how, call", [("wx", "mmap"), ("cow", "mprotect")])
def test_writable_copies_of_a_trusted_file_follow_the_anon_exec_rule(lab, writable_code, how, call) -> None:
    strict = lab.label(anon_exec="violation", trusted=[writable_code])
    r = strict.sh(f"{writable_code} {how} {lab.true}; echo rc=$?")
    _denied(r, f"{how} of a trusted file")
    assert r.stderr.startswith(f"{call}:")
    [v] = _violations(strict, "anon-exec" if call == "mmap" else "mprotect")
    assert v.detail["why"] == "anonymous-exec" and v.detail["ino"] == os.stat(lab.true).st_ino
    jit = lab.label(anon_exec="allow", trusted=[writable_code])
    assert jit.sh(f"{writable_code} {how} {lab.true}; echo rc=$?").stdout.split() == ["mapped", "rc=0"]


def test_audit_mode_allows_and_logs(lab) -> None:
    tp = lab.label(mode="audit")
    assert tp.sh(f"{lab.untrusted}; echo rc=$?").stdout.strip() == "rc=0"
    assert tp.sh(f"{lab.helper} mmap {lab.untrusted}; echo rc=$?").stdout.split() == ["mapped", "rc=0"]
    [v] = _violations(tp, "exec")
    assert v.detail["action"] == "allowed" and v.detail["why"] == "unmeasured"
    # the exec in audit mode maps the untrusted image too: every one logged, none denied
    maps = _violations(tp, "mmap")
    assert maps and all(m.detail["action"] == "allowed" and m.detail["ino"] == os.stat(lab.untrusted).st_ino for m in maps)


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
                 [lab.helper, "mmap", lab.untrusted], [lab.helper, "mprotect", lab.untrusted], [lab.helper, "anon"]):
        assert subprocess.run(argv, capture_output=True).returncode == 0, argv
    lab.collect(200)
    assert [e for e in lab.events[before:] if e.kind is EventKind.VIOLATION] == []


def test_reload_swaps_trust_and_running_tasks_keep_their_label(lab, tmp_path) -> None:
    tool = tmp_path / "tool"
    shutil.copy2("/usr/bin/true", tool)
    tp = lab.label(trusted=[str(tool)])
    sh = subprocess.Popen([tp.entrypoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sh.stdin.write(f"{tool}; echo rc=$?\n")
        sh.stdin.flush()
        assert sh.stdout.readline().strip() == "rc=0"
        lab.engine.reload(*lab._policy_and_entries(tp.name, tp.entrypoint))  # same label, tool no longer trusted
        sh.stdin.write(f"{tool}; echo rc=$?\n")
        sh.stdin.flush()
        assert sh.stdout.readline().strip() == "rc=126"  # denied, and the labelled shell still runs
    finally:
        sh.stdin.close()
        sh.wait(10)
    assert EPERM_TEXT in sh.stderr.read()
    assert _violations(tp, "exec")[0].subject == str(tool)
