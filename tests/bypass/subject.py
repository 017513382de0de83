"""A TP stays what it was measured to be (issue 21): each attack as a scenario over the backend under test.

Every scenario takes the PRIMA Lab (tests/bypass/lab.py), the compiled attack
programs (`Kit`) and the backend's `Outcome`: how that backend stops a violation
(tracepoint: SIGKILL of the offending process before its next instruction; lsm:
the syscall fails). A tier runs them by mixing `SubjectScenarios` into its
`BypassScenarios` class (one engine for both): tests/kernel/test_prima_bypass.py
(tracepoint, host kernel), tests/vm/guest/test_lsm_prima.py (lsm, in the VM).
Each asserts the outcome and the violation event; a few also go through the
verifier (tests/e2e/test_attest_e2e.py).

Attack programs print `ran N` when code they made or changed ran (N = 42: the
injected code, 7: the original), `refused <call> errno=<n>` when a call failed.
"""
from __future__ import annotations

import errno as errno_mod
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from controlplane.core.events import Event, EventKind
from controlplane.core.policy import parse_policy
from prima.selfprotect import DAEMON_LABEL_NAME
from tests.bypass.backend import Backend
from tests.bypass.lab import Lab, Label, shared_libs
from tests.prima_fixtures import measure_files

ATTACK_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

/* A page of code holding only cwl_target (returns 7): it can be made writable without
 * touching the code doing it. */
__asm__(".text\n.balign 4096\n.globl cwl_target\ncwl_target:\n\tmov $7, %eax\n\tret\n.balign 4096\n");
int cwl_target(void);
volatile int cwl_marker = 7;
static const unsigned char CODE42[] = {0xb8, 0x2a, 0, 0, 0, 0xc3}; /* mov $42, %eax; ret */

static int refused(const char *what) { printf("refused %s errno=%d\n", what, errno); fflush(stdout); return 3; }
static int ran(void *fn) { printf("ran %d\n", ((int (*)(void))fn)()); fflush(stdout); return 0; }
static void *page_of(void *p) { return (void *)((unsigned long)p & ~4095UL); }

/* a 32-bit syscall from this 64-bit process (int 0x80: ebx, ecx, edx, esi, edi, ebp = 0) */
static long int80(long nr, long a, long b, long c, long d, long e)
{
	long ret;
	__asm__ volatile("push %%rbp\n\txor %%ebp, %%ebp\n\tint $0x80\n\tpop %%rbp"
			 : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e) : "memory");
	return (int)ret;
}

int main(int argc, char **argv)
{
	if (argc < 2) return 2;
	const char *cmd = argv[1];
	pid_t pid = argc > 2 ? atoi(argv[2]) : 0;
	unsigned long addr = argc > 3 ? strtoul(argv[3], 0, 16) : 0;

	if (!strcmp(cmd, "victim")) {          /* a TP to attack: its code and data, then wait */
		printf("%d %lx %lx\n", getpid(), (unsigned long)cwl_target, (unsigned long)&cwl_marker);
		fflush(stdout);
		char line[16];
		if (!fgets(line, sizeof line, stdin)) return 4;
		printf("code=%d marker=%d\n", cwl_target(), cwl_marker);
		return 0;
	}
	if (!strcmp(cmd, "poke")) {            /* ptrace attach + POKETEXT into its code */
		int st;
		if (ptrace(PTRACE_ATTACH, pid, 0, 0)) return refused("ptrace");
		waitpid(pid, &st, __WALL);
		errno = 0;
		long word = ptrace(PTRACE_PEEKTEXT, pid, addr, 0);
		if (errno) return refused("peektext");
		memcpy(&word, CODE42, sizeof CODE42);
		if (ptrace(PTRACE_POKETEXT, pid, addr, word)) return refused("poketext");
		ptrace(PTRACE_DETACH, pid, 0, 0);
		puts("poked");
		return 0;
	}
	if (!strcmp(cmd, "memwrite")) {        /* /proc/PID/mem (argv[2]: a pid or "self") into code */
		char path[64];
		snprintf(path, sizeof path, "/proc/%s/mem", argv[2]);
		if (!strcmp(argv[2], "self")) addr = (unsigned long)cwl_target;
		int fd = open(path, O_RDWR);
		if (fd < 0) return refused("open");
		if (pwrite(fd, CODE42, sizeof CODE42, addr) != sizeof CODE42) return refused("pwrite");
		if (!strcmp(argv[2], "self")) return ran(cwl_target);
		puts("written");
		return 0;
	}
	if (!strcmp(cmd, "vmwrite")) {         /* process_vm_writev into its data */
		int v = 42;
		struct iovec l = {&v, sizeof v}, r = {(void *)addr, sizeof v};
		if (process_vm_writev(pid, &l, 1, &r, 1, 0) != sizeof v) return refused("process_vm_writev");
		puts("written");
		return 0;
	}
	if (!strcmp(cmd, "traceme-exec")) {    /* a child asks to be traced, then execs argv[2..] */
		int st;
		fflush(stdout);
		pid_t c = fork();
		if (c == 0) {
			ptrace(PTRACE_TRACEME, 0, 0, 0);
			execv(argv[2], argv + 2);
			_exit(refused("execv"));
		}
		waitpid(c, &st, 0);
		if (WIFSTOPPED(st)) {              /* stopped at the exec: the tracer could poke the new TP here */
			puts("stopped at exec");
			fflush(stdout);
			ptrace(PTRACE_DETACH, c, 0, 0);
			waitpid(c, &st, 0);
		}
		if (WIFSIGNALED(st)) printf("child signal %d\n", WTERMSIG(st));
		else printf("child exit %d\n", WEXITSTATUS(st));
		return 0;
	}
	if (!strcmp(cmd, "traceme")) {         /* the current process asks its parent to trace it */
		if (ptrace(PTRACE_TRACEME, 0, 0, 0)) return refused("ptrace");
		puts("traced");
		return 0;
	}
	if (!strcmp(cmd, "rwx-lib") || !strcmp(cmd, "rw-rx-lib") || !strcmp(cmd, "ro-rwx-lib")) {
		int fd = open(argv[2], O_RDONLY);
		if (fd < 0) return refused("open");
		int first = !strcmp(cmd, "rwx-lib") ? PROT_READ | PROT_WRITE | PROT_EXEC
			  : !strcmp(cmd, "rw-rx-lib") ? PROT_READ | PROT_WRITE : PROT_READ;
		unsigned char *p = mmap(0, 4096, first, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) return refused("mmap");
		if (!strcmp(cmd, "ro-rwx-lib") && mprotect(p, 4096, PROT_READ | PROT_WRITE | PROT_EXEC))
			return refused("mprotect");
		memcpy(p, CODE42, sizeof CODE42);
		if (!strcmp(cmd, "rw-rx-lib") && mprotect(p, 4096, PROT_READ | PROT_EXEC)) return refused("mprotect");
		return ran(p);
	}
	if (!strcmp(cmd, "text-rw-rx") || !strcmp(cmd, "text-rwx")) {   /* its own code */
		void *page = page_of((void *)cwl_target);
		int rwx = !strcmp(cmd, "text-rwx");
		if (mprotect(page, 4096, PROT_READ | PROT_WRITE | (rwx ? PROT_EXEC : 0))) return refused("mprotect");
		memcpy((void *)cwl_target, CODE42, sizeof CODE42);
		if (!rwx && mprotect(page, 4096, PROT_READ | PROT_EXEC)) return refused("mprotect");
		return ran(cwl_target);
	}
	if (!strcmp(cmd, "jit")) {             /* anonymous RWX memory, written and run */
		unsigned char *p = mmap(0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) return refused("mmap");
		memcpy(p, CODE42, sizeof CODE42);
		return ran(p);
	}
	if (!strcmp(cmd, "int80-mmap")) {      /* mmap2(0, 4096, RWX, PRIVATE|ANONYMOUS, -1, 0) */
		long r = int80(192, 0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1);
		if (r < 0 && r > -4096) { errno = -r; return refused("mmap2"); }
		void *p = (void *)(unsigned long)(unsigned int)r;
		memcpy(p, CODE42, sizeof CODE42);
		return ran(p);
	}
	if (!strcmp(cmd, "int80-mprotect")) {  /* RW below 4 GiB, written, then mprotect RX by int 0x80 */
		unsigned char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
		if (p == MAP_FAILED) return refused("mmap");
		memcpy(p, CODE42, sizeof CODE42);
		long r = int80(125, (long)p, 4096, PROT_READ | PROT_EXEC, 0, 0);
		if (r < 0) { errno = -r; return refused("mprotect"); }
		return ran(p);
	}
	if (!strcmp(cmd, "int80-getpid")) {    /* a harmless 32-bit syscall */
		printf("pid %ld\n", int80(20, 0, 0, 0, 0, 0));
		return 0;
	}
	if (!strcmp(cmd, "io-uring")) {
		char params[120];                  /* struct io_uring_params, zeroed */
		memset(params, 0, sizeof params);
		long fd = syscall(425, 4, params);
		if (fd < 0) return refused("io_uring_setup");
		puts("ring");
		return 0;
	}
	return 2;
}
"""

EXECSTACK_C = r"""
#include <stdio.h>
int main(void) { puts("ran 0"); return 0; }
"""

INJECTED, ORIGINAL = "ran 42", "ran 7"


@dataclass(frozen=True)
class Kit:
    """The compiled attack programs, and a trusted library to map (libc)."""

    attack: str
    execstack: str
    lib: str

    @property
    def trusted(self) -> list[str]:
        return [self.attack, self.execstack]


def build_kit(root: Path) -> Kit:
    """Compile the attack programs with gcc (-mno-red-zone: int80() pushes below the stack pointer)."""
    (root / "attack.c").write_text(ATTACK_C)
    (root / "execstack.c").write_text(EXECSTACK_C)
    attack, execstack = root / "attack", root / "execstack"
    subprocess.run(["gcc", "-O2", "-mno-red-zone", "-o", str(attack), str(root / "attack.c")], check=True)
    subprocess.run(["gcc", "-O2", "-z", "execstack", "-o", str(execstack), str(root / "execstack.c")], check=True)
    libc = next(p for p in shared_libs(str(attack)) if "/libc.so" in p)
    return Kit(str(attack), str(execstack), libc)


@dataclass(frozen=True)
class Outcome:
    """How the backend under test stops a violation, and how it names a few of them."""

    backend: str  # "tracepoint" | "lsm"

    @property
    def action(self) -> str:
        return "killed" if self.backend == "tracepoint" else "denied"

    def stopped(self, r: subprocess.CompletedProcess, call: str, *, errno: int = errno_mod.EPERM) -> None:
        """The offending process got nothing: killed (tracepoint), or `call` failed with `errno` (lsm)."""
        if self.backend == "tracepoint":
            assert r.returncode == -9, f"not killed: rc {r.returncode}, stdout {r.stdout!r}, stderr {r.stderr!r}"
        else:
            assert f"refused {call} errno={errno}" in r.stdout, f"not refused: rc {r.returncode}, {r.stdout!r} {r.stderr!r}"
        assert "ran" not in r.stdout and "poked" not in r.stdout and "written" not in r.stdout, r.stdout

    def modify_op(self, tracepoint_op: str) -> str:
        """The op of an outsider's write into a TP: lsm sees every one in ptrace_access_check."""
        return tracepoint_op if self.backend == "tracepoint" else "ptrace"


def run_in(label: Label, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run argv as a process of `label` (its entrypoint, a shell, execs it: a trusted image keeps the label)."""
    return subprocess.run([label.entrypoint, "-c", 'exec "$0" "$@"', *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def run_outside(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run argv unlabelled."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class Victim:
    """A TP process waiting to be attacked (started through `entrypoint`, a shell that enters its
    label): its pid and the addresses of its code and data."""

    def __init__(self, entrypoint: str, kit: Kit) -> None:
        self.proc = subprocess.Popen([entrypoint, "-c", 'exec "$0" "$@"', kit.attack, "victim"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        pid, self.code, self.data = self.proc.stdout.readline().split()
        self.pid = int(pid)

    def finish(self) -> str:
        """Let it run its code once more and exit: `code=N marker=M`."""
        os.kill(self.pid, 18)  # SIGCONT: a PTRACE_ATTACH's SIGSTOP outlives a tracer that was killed
        out, err = self.proc.communicate("go\n", timeout=30)
        assert self.proc.returncode == 0, (self.proc.returncode, out, err)
        return out.strip()

    def __enter__(self) -> "Victim":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def one_violation(label: Label, op: str, outcome: Outcome, *, why: str) -> Event:
    """The one violation `op` under `label`, enforced by this backend, for reason `why`."""
    found = label.events(EventKind.VIOLATION, op=op)
    assert len(found) == 1, [(e.op, e.subject, dict(e.detail)) for e in label.lab.events if e.label == label.name]
    v = found[0]
    assert v.detail["action"] == outcome.action and v.detail["why"] == why, dict(v.detail)
    return v


def assert_names_both(v: Event, actor_pid: int | None, actor_label: str, subject_pid: int, subject_label: str) -> None:
    """A subject violation names both processes (pids, labels), actor first."""
    actor, subject = v.subject.split("->")
    if actor_pid is not None:
        assert actor.startswith(f"tgid={actor_pid}("), v.subject
    assert actor.endswith(f",{actor_label or '-'})"), v.subject
    assert subject == f"tgid={subject_pid}({subject_label})", v.subject


# ---- 1. a TP as a subject: nobody outside its label modifies it ------------------------------

def attack_ptrace_poketext_from_unlabelled(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    tp = lab.label(trusted=kit.trusted)
    with Victim(tp.entrypoint, kit) as victim:
        r = run_outside(kit.attack, "poke", str(victim.pid), victim.code)
        outcome.stopped(r, "ptrace")
        assert victim.finish() == "code=7 marker=7"
    v = one_violation(tp, "ptrace", outcome, why="outside-label")
    assert_names_both(v, None, "", victim.pid, tp.name)
    assert v.detail["peer"] == victim.pid


def attack_traceme_then_exec_entrypoint(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    tp = lab.label(trusted=kit.trusted)
    r = run_outside(kit.attack, "traceme-exec", tp.entrypoint, "-c", "echo entered")
    assert "entered" not in r.stdout and "stopped at exec" not in r.stdout, r.stdout
    if outcome.backend == "tracepoint":
        assert "child signal 9" in r.stdout, r.stdout
    else:
        assert "refused execv errno=1" in r.stdout and "child exit 3" in r.stdout, r.stdout
    v = one_violation(tp, "exec", outcome, why="traced")
    assert v.subject == tp.entrypoint
    assert not tp.events(EventKind.LABEL_TRANSITION, timeout=0.2)


def attack_traceme_inside_a_tp(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    """A TP asks its (unlabelled) parent to trace it."""
    tp = lab.label(trusted=kit.trusted)
    r = run_in(tp, kit.attack, "traceme")
    if outcome.backend == "tracepoint":
        assert r.returncode == -9, r
    else:
        assert "refused ptrace errno=1" in r.stdout, r
    v = one_violation(tp, "traceme", outcome, why="outside-label")
    # the current process is the subject here: its parent, the test, would be the tracer; the lab's
    # engine runs in the test's process, which so holds the daemon's reserved label (issue 22)
    assert v.subject == (f"tgid={os.getpid()}({DAEMON_LABEL_NAME})->"
                         f"tgid={v.detail['tgid']}({v.detail['comm']},{tp.name})"), v.subject


def attack_proc_pid_mem_write(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    tp = lab.label(trusted=kit.trusted)
    with Victim(tp.entrypoint, kit) as victim:
        r = run_outside(kit.attack, "memwrite", str(victim.pid), victim.code)
        outcome.stopped(r, "open", errno=errno_mod.EACCES)  # lsm: mm_access turns the hook's EPERM into EACCES
        assert victim.finish() == "code=7 marker=7"
    v = one_violation(tp, outcome.modify_op("proc-mem"), outcome, why="outside-label")
    assert_names_both(v, None, "", victim.pid, tp.name)


def attack_process_vm_writev(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    tp = lab.label(trusted=kit.trusted)
    with Victim(tp.entrypoint, kit) as victim:
        r = run_outside(kit.attack, "vmwrite", str(victim.pid), victim.data)
        outcome.stopped(r, "process_vm_writev")
        after = victim.finish()
    # lsm: refused before the write. tracepoint: the SIGKILL sent at sys_enter is pending when the
    # syscall pins the victim's pages, and get_user_pages stops at a fatal signal (mm/gup.c): -EINTR.
    assert after == "code=7 marker=7", after
    v = one_violation(tp, outcome.modify_op("vm-write"), outcome, why="outside-label")
    assert_names_both(v, None, "", victim.pid, tp.name)


def legit_debugger_of_the_same_label_attaches(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    tp = lab.label(trusted=kit.trusted)
    with Victim(tp.entrypoint, kit) as victim:
        r = run_in(tp, kit.attack, "poke", str(victim.pid), victim.code)
        assert r.stdout.strip() == "poked", r
        assert victim.finish() == "code=42 marker=7"
    assert not tp.events(EventKind.VIOLATION, timeout=0.3)


def attack_debugger_of_another_label(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    """Labels protect each other too (the enforcement daemon's reserved label relies on it)."""
    a, b = lab.labels({}, {}, trusted=kit.trusted)
    with Victim(a.entrypoint, kit) as victim:
        r = run_in(b, kit.attack, "poke", str(victim.pid), victim.code)
        outcome.stopped(r, "ptrace")
        assert victim.finish() == "code=7 marker=7"
    v = one_violation(a, "ptrace", outcome, why="outside-label")
    assert_names_both(v, None, b.name, victim.pid, a.name)


# ---- 2. W^X: a TP makes no code of its own ---------------------------------------------------

def _wx(lab: Lab, kit: Kit, outcome: Outcome, argv: list[str], call: str, op: str, why: str = "anonymous-exec") -> Event:
    tp = lab.label(trusted=kit.trusted)
    r = run_in(tp, kit.attack, *argv)
    outcome.stopped(r, call)
    return one_violation(tp, op, outcome, why=why)


def attack_rwx_private_mapping_of_trusted_lib(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    _wx(lab, kit, outcome, ["rwx-lib", kit.lib], "mmap", "anon-exec")


def attack_rw_private_then_mprotect_rx(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    _wx(lab, kit, outcome, ["rw-rx-lib", kit.lib], "mprotect", "mprotect")


def attack_ro_private_then_mprotect_rwx(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    _wx(lab, kit, outcome, ["ro-rwx-lib", kit.lib], "mprotect", "mprotect")


def attack_own_text_rw_then_rx(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    _wx(lab, kit, outcome, ["text-rw-rx"], "mprotect", "mprotect")


def attack_own_text_rwx(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    _wx(lab, kit, outcome, ["text-rwx"], "mprotect", "mprotect")


def attack_proc_self_mem_into_own_text(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    v = _wx(lab, kit, outcome, ["memwrite", "self"], "open", "proc-mem")
    assert v.detail["peer"] == v.detail["tgid"]


def attack_execstack_binary(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    tp = lab.label(trusted=kit.trusted)
    r = run_in(tp, kit.execstack)
    assert "ran" not in r.stdout and r.returncode < 0, r  # killed (lsm: the exec fails past its point of no return)
    one_violation(tp, "exec-stack", outcome, why="anonymous-exec")


def attack_int80_mmap2_rwx(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    if outcome.backend == "tracepoint":
        _wx(lab, kit, outcome, ["int80-mmap"], "mmap2", "compat-syscall", why="compat-syscall")
    else:  # lsm: mmap_file judges a 32-bit mmap2 as any other
        _wx(lab, kit, outcome, ["int80-mmap"], "mmap2", "anon-exec")


def attack_int80_mprotect_rx(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    if outcome.backend == "tracepoint":
        _wx(lab, kit, outcome, ["int80-mprotect"], "mprotect", "compat-syscall", why="compat-syscall")
    else:
        _wx(lab, kit, outcome, ["int80-mprotect"], "mprotect", "mprotect")


def attack_io_uring_setup(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    """tracepoint: io_uring's operations would run unseen, so a TP may not set one up.
    lsm: every io_uring operation goes through the same LSM hooks: allowed."""
    tp = lab.label(trusted=kit.trusted)
    r = run_in(tp, kit.attack, "io-uring")
    if outcome.backend == "tracepoint":
        outcome.stopped(r, "io_uring_setup")
        one_violation(tp, "io-uring", outcome, why="io-uring")
    else:
        assert r.stdout.strip() == "ring", r
        assert not tp.events(EventKind.VIOLATION, timeout=0.3)


def legit_policy_switches_allow_compat_and_io_uring(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    tp = lab.label(trusted=kit.trusted, compat_syscalls="allow", io_uring="allow")
    r = run_in(tp, kit.attack, "int80-getpid")
    assert r.returncode == 0 and r.stdout.startswith("pid "), r
    assert run_in(tp, kit.attack, "io-uring").stdout.strip() == "ring"
    assert not tp.events(EventKind.VIOLATION, timeout=0.3)
    strict = lab.label(trusted=kit.trusted)
    r = run_in(strict, kit.attack, "int80-getpid")
    if outcome.backend == "tracepoint":  # lsm mediates what a 32-bit syscall does, not that it is one
        assert r.returncode == -9, r
        one_violation(strict, "compat-syscall", outcome, why="compat-syscall")
    else:
        assert r.returncode == 0, r


def legit_jit_label_runs_its_jit(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    jit = lab.label(anon_exec="allow", trusted=kit.trusted)
    for argv in (["jit"], ["rwx-lib", kit.lib], ["text-rw-rx"], ["memwrite", "self"]):
        r = run_in(jit, kit.attack, *argv)
        assert r.stdout.strip() == INJECTED, (argv, r)
    assert not jit.events(EventKind.VIOLATION, timeout=0.3)


def legit_trusted_code_still_maps(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    """W^X leaves what a loader does alone: a trusted program with its libraries, an RX mapping."""
    tp = lab.label(trusted=kit.trusted)
    r = run_in(tp, kit.attack, "victim")
    assert r.returncode == 4 and r.stdout.split()[0].isdigit(), r  # printed its addresses, found no stdin
    assert not tp.events(EventKind.VIOLATION, timeout=0.3)


# ---- 3. label transitions only as declared ---------------------------------------------------

def attack_label_hop_to_a_jit_label(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    a, b = lab.labels({}, {"anon_exec": "allow"}, trusted=kit.trusted)
    r = run_in(a, b.entrypoint, "-c", f"exec {kit.attack} jit")
    assert "ran" not in r.stdout, r
    if outcome.backend == "tracepoint":
        assert r.returncode == -9, r
    else:
        assert "Operation not permitted" in r.stderr, r
    v = one_violation(a, "transition", outcome, why="undeclared-transition")
    assert v.subject == b.entrypoint
    assert not b.events(EventKind.LABEL_TRANSITION, timeout=0.2)


def legit_declared_transition(lab: Lab, kit: Kit, outcome: Outcome) -> None:
    a, b = lab.labels({"transitions": [1]}, {"anon_exec": "allow"}, trusted=kit.trusted)
    r = run_in(a, b.entrypoint, "-c", f"exec {kit.attack} jit")
    assert r.stdout.strip() == INJECTED, r
    [hop] = b.events(EventKind.LABEL_TRANSITION)
    assert hop.op == f"exec-from-{a.name}" and hop.subject == b.entrypoint and hop.detail["from"] == a.name
    assert not a.events(EventKind.VIOLATION, timeout=0.2) and not b.events(EventKind.VIOLATION, timeout=0.2)


def attack_declared_transition_through_an_entrypoint_the_label_does_not_trust(lab: Lab, kit: Kit,
                                                                              outcome: Outcome) -> None:
    """Declared is not enough: the entrypoint must be trusted for the label being left."""
    a, b = lab.labels({"transitions": [1]}, {}, trusted=kit.trusted)
    lab.engine.reload(*_without(lab, a, b, drop=b.entrypoint, kit=kit))
    r = run_in(a, b.entrypoint, "-c", "echo entered")
    assert "entered" not in r.stdout, r
    v = one_violation(a, "transition", outcome, why="not-in-trust-set")
    assert v.subject == b.entrypoint


def _without(lab: Lab, a: Label, b: Label, *, drop: str, kit: Kit):
    """The policy of (a -> b) where `drop` is trusted for b's trust set only."""
    text = (f'mode = "enforce"\ntrust_sets = ["lab", "only_b"]\n'
            f'[labels.{a.name}]\nentrypoints = ["{a.entrypoint}"]\ntrust_set = "lab"\ntransitions = ["{b.name}"]\n'
            f'[labels.{b.name}]\nentrypoints = ["{b.entrypoint}"]\ntrust_set = "only_b"\n')
    both = measure_files([p for p in (*lab.base, a.entrypoint, *kit.trusted) if p != drop], 0b11)
    return parse_policy(text, source="hop.toml"), [*both, *measure_files([drop], 0b10)]


SCENARIOS: dict[str, Callable[[Lab, Kit, Outcome], None]] = {
    name.removeprefix("attack_").removeprefix("legit_"): fn for name, fn in dict(globals()).items()
    if name.startswith(("attack_", "legit_")) and callable(fn)
}


class SubjectScenarios:
    """Every scenario above against the class's `backend`, on the class's lab (BypassScenarios')."""

    backend: Backend

    @pytest.fixture(scope="class")
    @classmethod
    def kit(cls, lab: Lab) -> Kit:
        return build_kit(lab.root)

    @pytest.mark.parametrize("scenario", sorted(SCENARIOS))
    def test_subject(self, lab: Lab, kit: Kit, scenario: str) -> None:
        SCENARIOS[scenario](lab, kit, Outcome(self.backend.name))
