"""Boot Debian's kernel under virtme-ng with a fresh swtpm vTPM, run one command, return its status.

Why a VM: the host kernel refuses BPF LSM and has no TPM. The guest sees the
host's root read-only over 9p (the checkout and its venv included); only
`results_dir` is writable back to the host, so everything a run must keep is
written there. Recipe and gotchas: VM-TIER.md in the shared folder.

Every process started here (swtpm, vng and the qemu it runs) gets its own
process group and is killed by that group's id on every exit path: normal,
timeout, KeyboardInterrupt.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from controlplane.core.errors import CwliteError

REPO_ROOT = Path(__file__).resolve().parents[2]
# `integrity` must stay: without it `ima_policy=...` panics the 6.1 kernel.
DEFAULT_APPEND = "lsm=lockdown,capability,landlock,yama,integrity,bpf"
BOOTED_MARK = "[cwlite-vm] guest command started"
_SWTPM_WAIT = 10.0
_GRACE = 5.0


class VmError(CwliteError):
    """The VM could not be started, or did not finish in time; `.output` is what it printed."""

    def __init__(self, message: str, *, output: str = "", pids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.output = output
        self.pids = pids  # swtpm and vng (each led its own process group), all gone when this is raised


@dataclass(frozen=True)
class VmRun:
    """One finished boot: the guest command's exit status and everything the VM printed."""

    rc: int
    output: str
    seconds: float
    boot_seconds: float | None  # until the guest command started; None if it never did


def kernel_version_key(path: str) -> tuple[int, ...]:
    """Numeric sort key of a kernel image name: 6.1.0-56 after 6.1.0-9, 6.10 after 6.9."""
    return tuple(int(n) for n in re.findall(r"\d+", Path(path).name))


def find_kernel() -> Path:
    """Debian's newest installed amd64 kernel image (point releases bump the version: glob, never pin)."""
    images = sorted(glob.glob("/boot/vmlinuz-*-amd64"), key=kernel_version_key)
    if not images:
        raise VmError("/boot/vmlinuz-*-amd64: no Debian kernel image installed (make setup installs linux-image-amd64)")
    return Path(images[-1])


DEB_TIMEOUT = 2400.0  # `make deb` when build/deb has none: ~1 min idle, ~7 min under load (pip, cffi, xz)


def ensure_deb(log: Path) -> Path | None:
    """cwlite's Debian package in build/deb (`make deb` first when there is none, its output to `log`); None when
    this machine cannot build one (no dpkg-buildpackage) or the build failed (the log says why)."""
    found = sorted((REPO_ROOT / "build/deb").glob("cwlite_*_amd64.deb"))
    if not found and shutil.which("dpkg-buildpackage"):
        with log.open("w") as out:
            subprocess.run(["make", "deb"], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=DEB_TIMEOUT)
        found = sorted((REPO_ROOT / "build/deb").glob("cwlite_*_amd64.deb"))
    return found[-1] if found else None


def vng_path() -> Path:
    """virtme-ng from the venv that runs us (it is a test dependency in pyproject.toml)."""
    vng = Path(sys.executable).parent / "vng"
    if not vng.exists():
        found = shutil.which("vng")
        if found is None:
            raise VmError(f"{vng}: virtme-ng not installed (make setup installs it)")
        vng = Path(found)
    return vng


def _kill_group(proc: subprocess.Popen | None) -> None:
    """Terminate the process group we created for `proc` (its pid is the group id), then kill it."""
    if proc is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc.poll()  # reap the leader, or its zombie keeps the group "alive"
        if not _group_alive(proc.pid):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + _GRACE
        while time.monotonic() < deadline:
            proc.poll()
            if not _group_alive(proc.pid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _start_swtpm(state: Path) -> tuple[subprocess.Popen, Path]:
    sock = state / "swtpm.sock"
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl", f"type=unixio,path={sock}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + _SWTPM_WAIT
    while not sock.is_socket():
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace").strip() if proc.stdout else ""
            raise VmError(f"swtpm: exited with {proc.returncode} before creating {sock}: {out.splitlines()[-1] if out else 'no output'}")
        if time.monotonic() > deadline:
            _kill_group(proc)
            raise VmError(f"swtpm: {sock} not created within {_SWTPM_WAIT:.0f} s")
        time.sleep(0.05)
    return proc, sock


def vng_argv(command: str, *, results_dir: Path, tpm_socket: Path, append: str, kernel: Path, cwd: Path) -> list[str]:
    """The vng command line (gotchas 1, 7, 8 of VM-TIER.md: `--qemu-opts=`, --force-9p, --disable-kvm)."""
    tpm = f"-chardev socket,id=chrtpm,path={tpm_socket} -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0"
    return [
        str(vng_path()), "--run", str(kernel),
        "--disable-kvm", "--disable-microvm", "--force-9p",
        "--user", "root", "--cwd", str(cwd),
        f"--rwdir={results_dir}",
        f"--qemu-opts={tpm}",
        f"--append={append}",
        "--exec", f"echo '{BOOTED_MARK}'; {command}",
    ]  # fmt: skip


BOOT_TIMEOUT = 300.0  # to the guest command: ~15 s idle, ~65 s with IMA measuring every file, more under load
_TAIL = 8  # console lines quoted in a VmError


class _BootHang(VmError):
    """The guest never reached its command: a stuck boot, retried once (the command never ran)."""


def run_in_vm(
    command: str,
    *,
    results_dir: Path,
    timeout: float,
    append: str = DEFAULT_APPEND,
    kernel: Path | None = None,
    cwd: Path = REPO_ROOT,
    echo: Callable[[str], None] | None = None,
    boot_timeout: float = BOOT_TIMEOUT,
) -> VmRun:
    """Boot the kernel with a fresh vTPM, run `command` (a shell line) as root in `cwd`, power off.

    The guest can write only under `results_dir` (mounted at the same path).
    Output is streamed line by line to `echo` (default: this process's stdout)
    and returned. Raises VmError on a timeout (the VM is killed; the message
    quotes the console's last lines) or when swtpm or vng cannot start; a
    failing command is a VmRun with its nonzero rc. A boot that does not reach
    the command within `boot_timeout` is killed and booted once more (a rare
    TCG boot stall seen in CI; the command had not started, so nothing ran twice).
    """
    results_dir = Path(results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    kernel = kernel or find_kernel()
    echo = echo or (lambda line: (sys.stdout.write(line), sys.stdout.flush()))
    try:
        return _boot(command, results_dir, timeout, append, kernel, cwd, echo, boot_timeout)
    except _BootHang as hang:
        echo(f"[cwlite-vm] {hang}; booting once more\n")
        return _boot(command, results_dir, timeout, append, kernel, cwd, echo, boot_timeout)


def _boot(command: str, results_dir: Path, timeout: float, append: str, kernel: Path, cwd: Path,
          echo: Callable[[str], None], boot_timeout: float) -> VmRun:
    env = dict(os.environ, PATH=f"{vng_path().parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    lines: list[str] = []
    booted: list[float] = []
    started = threading.Event()
    swtpm = vm = None
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cwlite-vtpm-") as state:
        try:
            swtpm, sock = _start_swtpm(Path(state))
            argv = vng_argv(command, results_dir=results_dir, tpm_socket=sock, append=append, kernel=kernel, cwd=cwd)
            # A pipe, never a file: QEMU re-opens its stdout (gotcha 9).
            vm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)

            def pump() -> None:
                assert vm is not None and vm.stdout is not None
                for raw in iter(vm.stdout.readline, b""):
                    line = raw.decode(errors="replace")
                    if not booted and BOOTED_MARK in line:
                        booted.append(time.monotonic() - start)
                        started.set()
                    lines.append(line)
                    echo(line)

            def fail(cls: type[VmError], what: str) -> VmError:
                _kill_group(vm)
                _kill_group(swtpm)
                reader.join(timeout=_GRACE)
                tail = " | ".join(ln.strip() for ln in lines[-_TAIL:] if ln.strip()) or "no console output"
                return cls(f"{kernel.name}: {what} (VM killed); console's last lines: {tail}",
                           output="".join(lines), pids=(swtpm.pid, vm.pid))

            reader = threading.Thread(target=pump, name="vng-output", daemon=True)
            reader.start()
            if boot_timeout < timeout and not started.wait(boot_timeout) and vm.poll() is None:
                raise fail(_BootHang, f"boot did not reach the guest command within {boot_timeout:.0f} s")
            try:
                rc = vm.wait(timeout=max(0.0, timeout - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                raise fail(VmError, f"guest command did not finish within {timeout:.0f} s: {command}") from None
            reader.join(timeout=_GRACE)
        finally:
            _kill_group(vm)
            _kill_group(swtpm)
    return VmRun(rc=rc, output="".join(lines), seconds=time.monotonic() - start, boot_seconds=booted[0] if booted else None)


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.vm.harness CMD...`: run one command in the VM (results in ./vm-results)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="+")
    parser.add_argument("--results", type=Path, default=Path("vm-results"))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--append", default=DEFAULT_APPEND)
    args = parser.parse_args(argv)
    run = run_in_vm(" ".join(args.command), results_dir=args.results, timeout=args.timeout, append=args.append)
    print(f"[cwlite-vm] rc={run.rc} boot={run.boot_seconds and round(run.boot_seconds, 1)} s total={run.seconds:.1f} s", file=sys.stderr)
    return run.rc


if __name__ == "__main__":
    sys.exit(main())
