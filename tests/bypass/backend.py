"""The two enforcement backends as the bypass suite sees them: what a stopped attempt looks like, and where it runs.

A scenario (tests/bypass/scenarios.py) is written once; the backend it runs on
says what "stopped" means. The tracepoint backend acts after the kernel did
the call, so the process is SIGKILLed (its shell reports status 137); the lsm
backend refuses the call itself, which fails with EPERM while the caller lives
on and reports it (126 from the shell's exec, the helper's `perror` and 3, ...).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import pytest

from tests.conftest import requires


@dataclass(frozen=True)
class Killed:
    """tracepoint: the process is killed by SIGKILL; nothing is reported on its behalf."""

    status: int = 137
    action: str = "killed"

    def rc(self, if_denied: int) -> str:
        """What `echo rc=$?` prints after the stopped command: the kill's status, whatever it was doing."""
        return f"rc={self.status}"

    def reported(self, stderr: str, text: str | None = None, *, prefix: str = "") -> None:
        """A killed process never saw its call fail: no error text (EPERM's or `text`) reached stderr."""
        for t in {os.strerror(errno.EPERM), text or os.strerror(errno.EPERM)}:
            assert t not in stderr, f"killed, yet stderr reports {t!r}: {stderr!r}"


@dataclass(frozen=True)
class Denied:
    """lsm: the syscall fails with `errno`; the caller reports it and goes on."""

    errno: int = errno.EPERM
    action: str = "denied"

    def rc(self, if_denied: int) -> str:
        """What `echo rc=$?` prints: the status the caller chose on the failed call (126: the shell's
        "cannot execute"; the helper's 3; ld.so's 127)."""
        return f"rc={if_denied}"

    def reported(self, stderr: str, text: str | None = None, *, prefix: str = "") -> None:
        """The caller saw the call fail: `text` (default: strerror(errno), "Operation not permitted",
        never EACCES's "Permission denied") on stderr, which starts with `prefix`."""
        text = text or os.strerror(self.errno)
        assert text in stderr and stderr.startswith(prefix), f"want {prefix!r}...{text!r} on stderr: {stderr!r}"


@dataclass(frozen=True)
class Backend:
    """One backend: the engine's `backend=` name, the outcome of a stopped attempt, the marks it runs under."""

    name: str
    expect: Killed | Denied
    marks: tuple[pytest.MarkDecorator, ...]
    # How a violation on a mapped file names it (ebpf/exec.bpf.c CWL_EVENT_OBJ): the tracepoint
    # backend by its path within its filesystem, the lsm one by its dentry's name (its hooks share
    # event naming with the CDI hooks, which have a dentry and no file).
    maps_named_by_path: bool
    # The tracepoint backend keeps labels in a tgid map user space can list (Lab.labelled_processes);
    # the lsm one in task storage, which it cannot.
    labels_listable: bool
    # Port Authority: the lsm backend's socket_listen hook refuses a listen on a port no rule names
    # (a listen without a bind, on a port the kernel picks, included); the tracepoint backend has no
    # listen hook (cgroup programs see bind, not listen), so such a listener gets its port and
    # only its input is dropped.
    pa_judges_listen: bool = False

    def mapped_name(self, path: str) -> str:
        """The name a violation on an executable mapping of `path` carries."""
        return path if self.maps_named_by_path else os.path.basename(path)


TRACEPOINT = Backend("tracepoint", Killed(), (requires(root=True), requires(tool="gcc")),
                     maps_named_by_path=True, labels_listable=True)
LSM = Backend("lsm", Denied(), (requires(root=True), requires(lsm="bpf"), requires(tool="gcc")),
              maps_named_by_path=False, labels_listable=False, pa_judges_listen=True)
