"""A small lab for the PRIMA bypass suite and benchmarks: test-local entrypoints, a trusted helper, one engine.

The engine runs the backend the caller names (`backend="tracepoint"` on the
host kernel, `"lsm"` in the VM): the suite (tests/bypass/scenarios.py) is the
same for both. Only files created under the lab's own directory are entrypoints, so no other
process on this (shared) machine is ever labelled. System files (/usr/bin/true,
libc, ld.so) are trusted by inode, which changes nothing for unlabelled
processes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import pytest

from controlplane.core.events import Event, EventKind
from controlplane.core.policy import Policy, parse_policy
from prima.engine import LABEL_MAX, Engine
from prima.kernelview import KernelEntry
from tests.prima_fixtures import labelled_processes, measure_files

HELPER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/shm.h>
#include <unistd.h>
extern char **environ;
/* Each subcommand loads code one way, as an attacker inside a TP process would. */
int main(int argc, char **argv)
{
	if (argc < 2) return 2;
	const char *cmd = argv[1];
	if (!strcmp(cmd, "memfd")) {            /* copy a file into a memfd and fexecve it */
		int src = open(argv[2], O_RDONLY), m = memfd_create("cwl", 0);
		char buf[65536]; ssize_t n;
		if (src < 0 || m < 0) { perror("open"); return 3; }
		while ((n = read(src, buf, sizeof buf)) > 0) if (write(m, buf, n) != n) return 3;
		char *args[] = {argv[2], NULL};
		fexecve(m, args, environ);
		perror("fexecve"); return 3;
	}
	if (!strcmp(cmd, "shm-exec")) {  /* System V shared memory attached executable */
		int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
		if (id < 0) { perror("shmget"); return 3; }
		void *p = shmat(id, 0, SHM_EXEC);
		shmctl(id, IPC_RMID, 0);
		if (p == (void *)-1) { perror("shmat"); return 3; }
		puts("anon"); return 0;
	}
	if (!strcmp(cmd, "rie-mmap")) {  /* READ_IMPLIES_EXEC: the kernel turns PROT_READ into PROT_EXEC */
		int fd = open(argv[2], O_RDONLY);
		if (fd < 0 || personality(READ_IMPLIES_EXEC) < 0) { perror("personality"); return 3; }
		void *p = mmap(0, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) { perror("mmap"); return 3; }
		puts("mapped"); return 0;
	}
	if (!strcmp(cmd, "mmap") || !strcmp(cmd, "mprotect")) {   /* map a file executable */
		int fd = open(argv[2], O_RDONLY);
		if (fd < 0) { perror("open"); return 3; }
		int exec_now = !strcmp(cmd, "mmap");
		void *p = mmap(0, 4096, PROT_READ | (exec_now ? PROT_EXEC : 0), MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) { perror("mmap"); return 3; }
		if (!exec_now && mprotect(p, 4096, PROT_READ | PROT_EXEC)) { perror("mprotect"); return 3; }
		puts("mapped"); return 0;
	}
	if (!strcmp(cmd, "anon") || !strcmp(cmd, "anon-mprotect")) {  /* JIT-style memory */
		int rwx = !strcmp(cmd, "anon");
		void *p = mmap(0, 4096, PROT_READ | PROT_WRITE | (rwx ? PROT_EXEC : 0), MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) { perror("mmap"); return 3; }
		if (!rwx && mprotect(p, 4096, PROT_READ | PROT_EXEC)) { perror("mprotect"); return 3; }
		puts("anon"); return 0;
	}
	return 2;
}
"""

LDSO = "/lib64/ld-linux-x86-64.so.2"


def shared_libs(binary: str) -> list[str]:
    """The resolved shared objects `binary` maps (ldd), so they can be trusted."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(os.path.realpath(path))
    return libs


class Lab:
    """One engine on `backend`; each test gets a fresh label (fresh dedupe) with its own entrypoint."""

    def __init__(self, root: Path, *, backend: str = "tracepoint", ringbuf_pages: int | None = None) -> None:
        self.root = root
        self.shell = str(root / "sh-base")            # trusted, not an entrypoint
        shutil.copy2("/bin/sh", self.shell)
        self.helper = str(root / "helper")
        (root / "helper.c").write_text(HELPER_C)
        subprocess.run(["gcc", "-O2", "-o", self.helper, str(root / "helper.c")], check=True)
        self.untrusted = str(root / "untrusted")      # never measured
        shutil.copy2("/usr/bin/true", self.untrusted)
        self.true = os.path.realpath("/usr/bin/true")
        self.base = sorted({self.true, self.shell, self.helper, os.path.realpath(LDSO),
                            *shared_libs("/bin/sh"), *shared_libs(self.helper), *shared_libs(self.true)})
        self.events: list[Event] = []
        self._n = 0
        self._engine_args = {"backend": backend} if ringbuf_pages is None else {"backend": backend,
                                                                                "ringbuf_pages": ringbuf_pages}
        self.engine = self._fresh_engine()

    def _fresh_engine(self) -> Engine:
        """An engine whose policy holds one new label: label ids are never reused within an engine run
        (a process still holding an old id must never get a new label's rights), so a lab that has used
        up LABEL_MAX - 1 of them starts another engine."""
        self._n += 1
        first = Label(self, f"tp_lab{self._n}", self._new_entrypoint(f"tp_lab{self._n}"))
        self._engine_labels = 1
        return Engine(*self.policy_for(first), **self._engine_args)

    def _new_entrypoint(self, label: str) -> str:
        ep = str(self.root / f"ep-{label}")
        shutil.copy2("/bin/sh", ep)
        return ep

    def policy_for(self, *labels: "Label", trusted: Iterable[str] = ()) -> tuple[Policy, list[KernelEntry]]:
        """The policy holding only `labels` (their settings, their entrypoints) and the entries trusting
        the lab's base files, the entrypoints and `trusted`: what `Engine.reload` takes."""
        text = f'mode = "{labels[0].mode}"\ntrust_sets = ["lab"]\n'
        for lb in labels:
            text += (f'[labels.{lb.name}]\nentrypoints = ["{lb.entrypoint}"]\ntrust_set = "lab"\n'
                     f'on_exec = "{lb.on_exec}"\nanon_exec = "{lb.anon_exec}"\n')
            text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in lb.keys.items())
        policy = parse_policy(text, source=f"{labels[0].name}.toml")
        self.last_entries = measure_files([*self.base, *(lb.entrypoint for lb in labels), *trusted], 1)
        return policy, self.last_entries

    def label(self, *, mode: str = "enforce", on_exec: str = "keep", anon_exec: str = "violation",
              trusted: Iterable[str] = (), **keys: str) -> "Label":
        """Reload the engine with a new label whose entrypoint is a fresh copy of /bin/sh, or the shell at
        `entrypoint=PATH` (`keys`: more of the label's policy keys, e.g. compat_syscalls="allow")."""
        return self.labels(dict(on_exec=on_exec, anon_exec=anon_exec, **keys), mode=mode, trusted=trusted)[0]

    def labels(self, *specs: dict, mode: str = "enforce", trusted: Iterable[str] = ()) -> list["Label"]:
        """Reload the engine with one new label per spec (its policy keys; "transitions" names
        other specs by index), each entered through its own fresh copy of /bin/sh."""
        if self._engine_labels + len(specs) > LABEL_MAX - 1:
            self.collect(0)
            self.engine.close()
            self.engine = self._fresh_engine()
        self._engine_labels += len(specs)
        names = []
        for _ in specs:
            self._n += 1
            names.append(f"tp_lab{self._n}")
        labels = []
        for name, spec in zip(names, specs):
            keys = dict(spec)
            on_exec, anon_exec = keys.pop("on_exec", "keep"), keys.pop("anon_exec", "violation")
            entrypoint = keys.pop("entrypoint", None) or self._new_entrypoint(name)
            if "transitions" in keys:
                keys["transitions"] = [names[i] for i in keys["transitions"]]
            labels.append(Label(self, name, entrypoint, mode=mode, on_exec=on_exec, anon_exec=anon_exec, keys=keys))
        self.engine.reload(*self.policy_for(*labels, trusted=trusted))
        return labels

    def reload(self, label: "Label", *, trusted: Iterable[str] = ()) -> None:
        """Reload with the same `label` and new trust: running members keep the label."""
        self.engine.reload(*self.policy_for(label, trusted=trusted))

    def labelled_processes(self) -> dict[int, str]:
        """tgid -> label, as the tracepoint backend's task map holds them (lsm keeps labels in task
        storage, which user space cannot list)."""
        return labelled_processes(self.engine)

    def collect(self, timeout_ms: int = 50) -> list[Event]:
        self.events += self.engine.poll(timeout_ms)
        return self.events

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 5.0) -> list[Event]:
        """Events matching `pred`, polling until at least one arrived or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.collect() if pred(e)]
            if found or time.monotonic() > deadline:
                return found

    def close(self) -> None:
        self.engine.close()


class Label:
    """A label of the lab's policy, entered by exec of its own entrypoint (a copy of /bin/sh)."""

    def __init__(self, lab: Lab, name: str, entrypoint: str, *, mode: str = "enforce", on_exec: str = "keep",
                 anon_exec: str = "violation", keys: dict | None = None) -> None:
        self.lab, self.name, self.entrypoint = lab, name, entrypoint
        self.mode, self.on_exec, self.anon_exec = mode, on_exec, anon_exec
        self.keys = keys or {}  # more policy keys of the label (transitions, compat_syscalls, io_uring)

    def sh(self, script: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run `script` in a process that entered this label (exec of the entrypoint)."""
        return subprocess.run([self.entrypoint, "-c", script], capture_output=True, text=True, timeout=timeout)

    def events(self, kind: EventKind | None = None, *, op: str | None = None, timeout: float = 5.0) -> list[Event]:
        return self.lab.wait_for(lambda e: e.label == self.name and (kind is None or e.kind is kind)
                                 and (op is None or e.op == op), timeout)

    def violations(self, op: str | None = None, timeout: float = 5.0) -> list[Event]:
        return self.events(EventKind.VIOLATION, op=op, timeout=timeout)


UNIT_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
struct rec%(i)d { char name[32]; int key; double weight; };
static int cmp%(i)d(const void *a, const void *b) {
	const struct rec%(i)d *x = a, *y = b;
	return x->key != y->key ? (x->key > y->key) - (x->key < y->key) : strcmp(x->name, y->name);
}
double unit%(i)d(int n) {
	struct rec%(i)d *r = calloc(n, sizeof *r);
	double s = 0;
	for (int k = 0; k < n; k++) { snprintf(r[k].name, sizeof r[k].name, "r%%d-%%d", %(i)d, k); r[k].key = (k * 7919) %% 101; r[k].weight = k / 3.0; }
	qsort(r, n, sizeof *r, cmp%(i)d);
	for (int k = 0; k < n; k++) s += r[k].weight * (strlen(r[k].name) + r[k].key);
	free(r);
	return s;
}
"""


def c_project(root: Path, units: int = 48, *, extra_recipe: str = "") -> Path:
    """A C project: `units` translation units and a main, built by make (gcc, cc1, as, collect2, ld);
    `extra_recipe` is one more command of the link rule."""
    src = root / "proj"
    src.mkdir()
    for i in range(units):
        (src / f"u{i}.c").write_text(UNIT_C % {"i": i})
    calls = "".join(f"\ts += unit{i}(50);\n" for i in range(units))
    decls = "".join(f"double unit{i}(int);\n" for i in range(units))
    (src / "main.c").write_text(f'#include <stdio.h>\n{decls}int main(void) {{\n\tdouble s = 0;\n{calls}\tprintf("%f\\n", s);\n\treturn 0;\n}}\n')
    objs = " ".join(f"u{i}.o" for i in range(units))
    extra = f"\t{extra_recipe}\n" if extra_recipe else ""
    (src / "Makefile").write_text(f"app: main.o {objs}\n\tgcc -o app main.o {objs}\n{extra}%.o: %.c\n\tgcc -O2 -c -o $@ $<\n")
    return src


class OnLab:
    """A scenario class run on one backend (its `backend`, a tests.bypass.backend.Backend), with one
    lab (one engine, so one bcc compile) shared by all its scenarios; `lab_dir` names its directory."""

    lab_dir = "prima"

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, tmp_path_factory: pytest.TempPathFactory):
        """One engine on the class's backend for all its scenarios."""
        lab = Lab(tmp_path_factory.mktemp(f"{cls.lab_dir}-{cls.backend.name}"), backend=cls.backend.name)
        assert lab.engine.backend == cls.backend.name
        yield lab
        lab.close()
