"""The VM Verifier (VMV) on the host: boot a Build VM from measured parts with its own vTPM, and vouch for it.

`up` copies the boot parts (kernel, initrd, policy, measurement DB, and with
--disk the root disk image) into the VM's directory `<data>/vms/NAME/` (what
is measured is what boots: qemu reads these copies, never the caller's files;
without --initrd the initrd is virtme-ng's own initramfs, built once per
kernel by `build_initrd` and booted in place of the one virtme-ng makes at
every boot), makes or reuses the VM's swtpm vTPM there, and asks virtme-ng
for the qemu command line it would run (`vng --dry-run`, `qemu_argv`): that
argv, kept in `qemu.json`, is what the supervisor runs, so its `-append` is
exactly the command line the guest kernel gets (its /proc/cmdline), and that
string is the measured cmdline part. Then it records in the HOST's
measurement log (through `cwlite serve`'s control socket) the parts' digests
and a vm-vtpm entry binding the vTPM's EK and AK (controlplane.core.vmrecord).
Only then does it start the supervisor: a background process (own session,
pidfile `supervisor.pid`) that runs the vTPM's swtpm and qemu (software
emulation; KVM when /dev/kvm works) with the VM's attestation and distccd
ports forwarded to loopback, and writes the console to `console.log`.

A VM booted from a disk image (`vm up --disk`, an image `cwlite vm image`
builds) has the image as its root, attached read-only (qemu `readonly=on`),
a fresh writable scratch disk per boot mounted on the guest's /tmp, and sees
of the host only what virtme-ng exports (its guest tools, the kernel's
modules) and the VM's policy and DB (`share/`, read-only at GUEST_SHARE).

A vTPM state is reused only when this host's own record (`<data>/vm-records/
NAME.json`, outside the VM's directory) names the same EK and AK: a state
copied from another host has no record here and is refused ("unknown-vtpm").
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from controlplane.core.atomic import write_atomic
from controlplane.core.errors import VmError
from controlplane.core.policy import load_policy
from controlplane.core.digest import sha256_file
from controlplane.core.vmrecord import VmRecord, check_vm_name, cmdline_digest
from controlplane.host import control
from controlplane.host.swtpm import STATE_FILE, Swtpm
from controlplane.host.tpm import Tpm
from prima.measure import mounts

# `integrity` must stay: without it `ima_policy=...` panics Debian's 6.1 kernel (VM-TIER.md gotcha 6).
APPEND = "lsm=lockdown,capability,landlock,yama,integrity,bpf"
GUEST_PORT = 8443                 # the VM's attestation service
DISTCC_PORT = 3632                # distccd
VM_PCR = 11                       # the guest kernel's IMA measures into 10
GUEST_DATA = "/run/cwlite"        # the guest's data dir (tmpfs: the guest sees the host's root read-only)
BOOTED_MARK = "[cwlite-vm] guest init started"
ENFORCING_MARK = "[cwlite-vm] enforcing"
READY_MARK = "[cwlite-vm] ready"
FAILED_MARK = "[cwlite-vm] failed"
DEFAULT_WORKLOAD = f"/usr/bin/distccd --no-detach --daemon --allow 10.0.2.0/24 --listen 0.0.0.0 --port {DISTCC_PORT} --log-stderr"
# virtme-ng's writable overlays the guest keeps (the workload's scratch space); its others are taken away
GUEST_SCRATCH = ("/tmp", "/var")
# virtme-ng mounts fresh tmpfs over these in the guest: a VM directory there is invisible to the guest
GUEST_HIDDEN = ("/run", "/var/tmp", "/var/log", "/var/cache", "/var/lib/apt", "/var/lib/sudo", "/var/lib/private",
                "/dev")
CMDLINE_MARK = "[cwlite-vm] /proc/cmdline:"
# a VM booted from a disk image: its cwlite (the Debian package's launcher), where it sees the VM's policy and DB
# (a directory of the image, under no overlay virtme-ng mounts), and its scratch disk (virtio-blk serial)
GUEST_CWLITE = "/usr/bin/cwlite"
GUEST_SHARE = "/mnt/cwlite-vm"
SCRATCH_SERIAL = "cwlite-scratch"
SCRATCH_SIZE = 4 << 30            # sparse: a fresh ext4 each boot, mounted on the guest's /tmp
ROOT_FSTYPE = "ext4"
KERNEL_CMDLINE_SIZE = 2048       # x86's COMMAND_LINE_SIZE (arch/x86/include/uapi/asm/setup.h), the NUL included
_SWTPM_WAIT = 10.0
_GRACE = 10.0


@dataclass(frozen=True)
class VmDir:
    """The files of VM `name` under the host's data dir."""

    data_dir: Path
    name: str

    @property
    def root(self) -> Path:
        return self.data_dir / "vms" / self.name

    kernel = property(lambda self: self.root / "kernel")
    initrd = property(lambda self: self.root / "initrd")
    disk = property(lambda self: self.root / "disk.img")                # the root disk image (vm up --disk)
    scratch = property(lambda self: self.root / "scratch.img")          # the disk VM's writable scratch disk
    share = property(lambda self: self.root / "share")                  # policy and DB as a disk VM's guest sees them
    qemu_argv = property(lambda self: self.root / "qemu.json")          # the qemu argv the supervisor runs
    tpm_socket = property(lambda self: self.vtpm / "qemu.sock")
    guest_rc = property(lambda self: self.root / "guest.rc")            # the guest command's exit status
    policy = property(lambda self: self.root / "policy.toml")
    db = property(lambda self: self.root / "measure.db")
    vtpm = property(lambda self: self.root / "vtpm")
    config = property(lambda self: self.root / "vm.json")
    console = property(lambda self: self.root / "console.log")
    pidfile = property(lambda self: self.root / "supervisor.pid")
    qemu_pidfile = property(lambda self: self.root / "qemu.pgid")      # vng/qemu lead their own process group
    exit_file = property(lambda self: self.root / "exit.json")

    @property
    def record_file(self) -> Path:
        """This host's record of the vTPM it made for the VM: kept OUTSIDE the VM's directory."""
        return self.data_dir / "vm-records" / f"{self.name}.json"


@dataclass(frozen=True)
class VmConfig:
    """How the VM boots (written once at the first `up`, reused by every restart)."""

    name: str
    root: str                     # the VM's directory (the guest sees it read-only at the same path)
    attest_port: int
    distcc_port: int
    workload: str
    python: str
    memory: str = "1G"
    disk: bool = False            # booted from a disk image (vm up --disk), not over the host's root

    @classmethod
    def read(cls, path: Path) -> "VmConfig":
        """vm.json (keys a newer or older cwlite wrote and this one does not know are ignored)."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError) as exc:
            raise VmError(f"{path}: not a VM config ({exc})", reason="usage") from exc

    def guest_command(self) -> str:
        """The guest's first command: cwlite's early start (enforcement + service), then the workload. Over the
        host's root it is this cwlite (the same Python, the VM's files at their host paths); from a disk image,
        the image's own cwlite, its scratch disk and the VM's files at GUEST_SHARE."""
        if self.disk:
            head, files = [GUEST_CWLITE, "vm", "guest-init", "--root", "disk", "--scratch", SCRATCH_SERIAL], GUEST_SHARE
        else:
            head, files = [self.python, "-m", "controlplane.cli", "vm", "guest-init"], self.root
        return shlex.join([*head, "--policy", f"{files}/policy.toml", "--db", f"{files}/measure.db",
                           "--pcr", str(VM_PCR), "--port", str(GUEST_PORT), "--workload", self.workload])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_pid(vm: VmDir) -> int | None:
    """The supervisor's pid when it still runs (a stale pidfile says nothing)."""
    try:
        pid = int(vm.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if _pid_alive(pid) and str(vm.root).encode() in argv else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the vTPM --------------------------------------------------------------------------------------------
def vtpm_identity(vtpm_dir: Path) -> tuple[bytes, bytes]:
    """(EK public, AK public) of the vTPM whose state is in `vtpm_dir`, manufactured (EK certificate by a local
    CA) and its AK made persistent on first use. TPM commands: ReadPublic, CreatePrimary + EvictControl once."""
    sw = Swtpm.start(vtpm_dir)
    with Tpm(sw.tcti, swtpm=sw) as tpm:       # closing it stops swtpm, which saves the state
        return tpm.ek_public(), tpm.ak_public()


def _check_record(vm: VmDir, ek: bytes, ak: bytes) -> None:
    try:
        rec = json.loads(vm.record_file.read_text())
    except FileNotFoundError:
        raise VmError(f"{vm.vtpm}: a vTPM state this host has no record of ({vm.record_file} missing): a state "
                      "copied from another host is refused; migrate it (README: VM migration) or remove it",
                      reason="unknown-vtpm", vm=vm.name) from None
    except ValueError as exc:
        raise VmError(f"{vm.record_file}: not JSON ({exc})", reason="unknown-vtpm", vm=vm.name) from exc
    got = {"ek_sha256": hashlib.sha256(ek).hexdigest(), "ak_sha256": hashlib.sha256(ak).hexdigest()}
    for key, value in got.items():
        if rec.get(key) != value:
            raise VmError(f"{vm.vtpm}: the vTPM's {key[:2].upper()} ({value[:16]}) is not the one this host "
                          f"recorded ({str(rec.get(key))[:16]}) in {vm.record_file}: the state was replaced",
                          reason="unknown-vtpm", vm=vm.name)


def prepare_vtpm(vm: VmDir, say: Callable[[str], None]) -> tuple[bytes, bytes, str]:
    """The vTPM's EK and AK publics and the op to log: `create` for a new vTPM, `restart` for this host's own."""
    if (vm.vtpm / "state" / STATE_FILE).exists():
        ek, ak = vtpm_identity(vm.vtpm)
        _check_record(vm, ek, ak)
        say(f"vTPM {vm.vtpm}: this host's own state (EK {hashlib.sha256(ek).hexdigest()[:16]}), reused")
        return ek, ak, "restart"
    if vm.record_file.exists():
        raise VmError(f"{vm.record_file}: this host made a vTPM for {vm.name} but its state {vm.vtpm} is gone: "
                      "remove the record to make a new vTPM", reason="vtpm-lost", vm=vm.name)
    say(f"vTPM {vm.vtpm}: manufacturing (swtpm_setup, EK certificate) and creating the AK")
    ek, ak = vtpm_identity(vm.vtpm)
    vm.record_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(vm.record_file, json.dumps({"name": vm.name, "ek_sha256": hashlib.sha256(ek).hexdigest(),
                                             "ak_sha256": hashlib.sha256(ak).hexdigest(),
                                             "created": time.time()}, sort_keys=True).encode())
    return ek, ak, "create"


# up ----------------------------------------------------------------------------------------------------
def _install(src: Path | None, dst: Path, what: str) -> None:
    """Copy a boot part into the VM's directory (qemu boots the copy: what was measured is what boots)."""
    if src is None:
        if not dst.exists():
            raise VmError(f"{dst}: no {what} yet: give --{what} on the first `vm up`", reason="usage")
        return
    try:
        shutil.copyfile(src, dst.with_name(dst.name + ".new"))
        os.replace(dst.with_name(dst.name + ".new"), dst)
    except OSError as exc:
        raise VmError(f"{src}: cannot copy the {what} into {dst.parent}: {exc.strerror or exc}", reason="usage") from exc


def measure(vm: VmDir, cfg: VmConfig, ek: bytes, ak: bytes) -> VmRecord:
    """The record the host logs for this boot: the installed parts' digests (the cmdline: the -append of the
    qemu argv the supervisor will run) and the vTPM's key digests."""
    parts = {
        "kernel": sha256_file(vm.kernel),
        "initrd": sha256_file(vm.initrd),
        "cmdline": cmdline_digest(boot_cmdline(vm)),
        "policy": load_policy(vm.policy).digest(),
    }
    if cfg.disk:
        parts["disk"] = sha256_file(vm.disk)
    return VmRecord(vm.name, parts, hashlib.sha256(ek).digest(), hashlib.sha256(ak).digest(), VM_PCR,
                    cfg.attest_port)


def _venv_tool(name: str) -> Path:
    """virtme-ng's commands from the venv that runs us (a test dependency), else from PATH."""
    tool = Path(sys.executable).parent / name
    return tool if tool.exists() else Path(shutil.which(name) or name)


def _tool_env(tool: Path) -> dict[str, str]:
    # vng runs virtme-run by name (VM-TIER.md gotcha 2)
    return dict(os.environ, PATH=f"{tool.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")


def build_initrd(kernel: Path, out: Path, *, disk: bool = False) -> None:
    """virtme-ng's initramfs for `kernel` (its busybox init and the kernel's virtio, 9p and overlay modules;
    with `disk`, the one that mounts a root disk: virtio_blk and ext4 too) written to `out`. virtme-ng makes
    the same one at every boot into a temporary file nobody measured; built here once, it is measured and
    booted instead. Deterministic: the same kernel, modules, busybox and virtme-ng give the same bytes, so a
    verifier can rebuild its reference (`cwlite vm initrd [--disk]`)."""
    run = _venv_tool("virtme-run")
    tmp = out.with_name(out.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()                            # virtme-run creates it exclusively
    argv = [str(run), "--kimg", str(kernel), "--mods", "auto", "--force-9p", "--overlay-rwdir", "/tmp",
            "--disable-microvm", "--dry-run", "--save-initramfs", str(tmp)]
    if disk:        # the image itself plays no part in the initramfs: any existing file names the root disk
        argv += ["--root-disk", "/dev/null", "--root-fstype", ROOT_FSTYPE]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=_tool_env(run), timeout=300,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmError(f"{kernel}: cannot build the initrd with {run}: {exc}", reason="usage") from exc
    if proc.returncode != 0 or not tmp.is_file():
        raise VmError(f"{kernel}: virtme-run could not build the initrd (exit {proc.returncode}): "
                      f"{(proc.stderr or proc.stdout).strip()[-300:]}", reason="usage")
    os.replace(tmp, out)


def up(data_dir: Path, name: str, *, kernel: Path | None, policy: Path | None,
       db: Path | None, initrd: Path | None = None, disk: Path | None = None, host_root: bool = False,
       workload: str | None = None, timeout: float = 1800.0, say: Callable[[str], None] = print) -> dict:
    """Measure, vouch, boot and wait until the VM's enforcement and attestation service run; its facts.
    `disk`: boot from this root disk image (read-only) instead of the host's root; a VM keeps the root it was
    made with unless `disk` or `host_root` says otherwise."""
    vm = VmDir(Path(data_dir).resolve(), check_vm_name(name))
    if disk is not None and host_root:
        raise VmError(f"VM {name}: --disk and --host-root name two roots: give one", reason="usage", vm=name)
    if running_pid(vm) is not None:
        raise VmError(f"VM {name}: already running (pid {running_pid(vm)}); `cwlite vm down {name}` first",
                      reason="running", vm=name)
    fresh = not vm.config.exists()
    if fresh and (kernel is None or policy is None or db is None):
        raise VmError(f"VM {name}: a new VM needs --kernel, --policy and --db", reason="usage", vm=name)
    old = VmConfig.read(vm.config) if not fresh else None
    on_disk = disk is not None or (old is not None and old.disk and not host_root)
    hidden = [h for h in GUEST_HIDDEN if vm.root.is_relative_to(h)]
    if hidden and not on_disk:
        raise VmError(f"{vm.root}: under {hidden[0]}, which the guest sees as an empty tmpfs (virtme-ng): "
                      "use another --data-dir", reason="usage", vm=name)
    vm.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg = VmConfig(name=name, root=str(vm.root),
                   attest_port=old.attest_port if old else _free_port(),
                   distcc_port=old.distcc_port if old else _free_port(),
                   workload=workload or (old.workload if old else DEFAULT_WORKLOAD),
                   python=sys.executable, disk=on_disk)
    ek, ak, op = prepare_vtpm(vm, say)
    for src, dst, what in ((kernel, vm.kernel, "kernel"), (policy, vm.policy, "policy"), (db, vm.db, "db")):
        _install(src, dst, what)
    if on_disk:
        if disk is not None:
            say(f"disk {vm.disk}: copying the root disk image ({disk.stat().st_size >> 20} MiB)")
        _install(disk, vm.disk, "disk")
        vm.share.mkdir(exist_ok=True, mode=0o755)           # what the guest sees of the VM's files
        for f in (vm.policy, vm.db):
            _install(f, vm.share / f.name, f.stem)
    if initrd is not None:
        _install(initrd, vm.initrd, "initrd")
    elif kernel is not None or not vm.initrd.exists() or (old is not None and old.disk != on_disk):
        say(f"initrd {vm.initrd}: building virtme-ng's initramfs for the kernel"
            + (" (root disk)" if on_disk else ""))       # a new kernel needs its own modules; a disk root its own init
        build_initrd(vm.kernel, vm.initrd, disk=on_disk)
    load_policy(vm.policy)                   # a policy the guest would refuse is refused before anything is logged
    write_atomic(vm.config, json.dumps(asdict(cfg), sort_keys=True, indent=1).encode(), mode=0o644)
    say("qemu command line: asking virtme-ng (vng --dry-run)")
    write_atomic(vm.qemu_argv, json.dumps({"argv": qemu_argv(vm, cfg)}, indent=1).encode(), mode=0o644)
    record = measure(vm, cfg, ek, ak)
    with control.client(vm.data_dir) as host_log:
        entries = host_log.record_all(record.events(op))
    for e in entries:
        say(f"host log entry {e['index']} (PCR {e['pcr']}): {e['name'][:100]}")
    for f in (vm.console, vm.exit_file, vm.guest_rc):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    supervisor = subprocess.Popen([sys.executable, "-m", "controlplane.host.vmv", "supervise", str(vm.root)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True, cwd="/")
    say(f"booting {name} (qemu, {'KVM' if kvm_usable() else 'software emulation'}, "
        f"{'root disk ' + str(vm.disk) if on_disk else 'the host root'}); console {vm.console}")
    _wait_ready(vm, supervisor, timeout, say)
    return status(vm)


def _wait_ready(vm: VmDir, supervisor: subprocess.Popen, timeout: float, say: Callable[[str], None]) -> None:
    deadline, seen, start = time.monotonic() + timeout, set(), time.monotonic()
    marks = ((BOOTED_MARK, "kernel booted, cwlite early start running"),
             (ENFORCING_MARK, "cwlite enforcing and attestation service up (before any workload)"),
             (READY_MARK, "workload started: ready"))
    while True:
        text = vm.console.read_text(errors="replace") if vm.console.exists() else ""
        for mark, what in marks:
            if mark in text and mark not in seen:
                seen.add(mark)
                say(f"[{time.monotonic() - start:5.1f}s] {what}")
        if READY_MARK in seen:
            return
        dead = FAILED_MARK in text or supervisor.poll() is not None
        if dead or time.monotonic() > deadline:
            tail = " | ".join(text.strip().splitlines()[-6:])
            if not dead:
                down(vm.data_dir, vm.name)
            raise VmError(f"VM {vm.name}: {'stopped' if dead else f'not ready within {timeout:.0f} s'} before its "
                          f"workload started; console {vm.console}: {tail}", reason="boot", vm=vm.name)
        time.sleep(0.5)


def kvm_usable() -> bool:
    """KVM only when asked (CWLITE_VM_KVM=1) and /dev/kvm opens: on machines like these /dev/kvm opens but
    qemu aborts on it (`failed to set MSR 0x10a`, VM-TIER.md gotcha 8), so software emulation is the default."""
    if os.environ.get("CWLITE_VM_KVM") != "1":
        return False
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    return True


# the guest's side: its root ----------------------------------------------------------------------------
def uncover_host_root(keep: Sequence[str] = GUEST_SCRATCH, *, under: str = "/") -> list[str]:
    """In the guest, before cwlite starts: lazily unmount virtme-ng's writable overlays over the host's root
    (each mounted over its own lower directory, `lowerdir=/usr` on /usr) at or below `under`, but those in
    `keep`; the points unmounted, in order. Why: under such an overlay a file's stat() gives the layer's pseudo device while an
    exec sees the overlay's inode, and the layer inode the overlay shows (9p's) has no path left to measure
    it by, so the workload could never be judged trusted there (prima.kernelview). Without them every new
    lookup reaches the 9p root itself, read-only (qemu exports it `readonly=on`), keyed as stat() says.
    Processes started before keep what they opened."""
    done: list[str] = []
    for _round in range(8):             # overlays stacked on one another (virtme-ng mounts them in parallel)
        covering = [m for m in mounts() if m.fstype == "overlay" and m.point not in keep
                    and os.path.commonpath([under, m.point]) == under and any(m.hides(d) for d in m.layer_dirs())]
        if not covering:
            return done
        for m in reversed(covering):    # the newest first: it may sit on an older one
            proc = subprocess.run(["umount", "-l", m.point], capture_output=True, text=True)
            if proc.returncode != 0:
                raise VmError(f"{m.point}: cannot unmount virtme-ng's overlay over the host root: "
                              f"{proc.stderr.strip() or proc.returncode}", reason="boot")
            done.append(m.point)
    raise VmError(f"overlays over the host root still mounted after unmounting {done}", reason="boot")


# the supervisor (a background process per VM) ----------------------------------------------------------
def vng_argv(vm: VmDir, cfg: VmConfig) -> list[str]:
    """virtme-ng for this VM: over the host's root (read-only 9p) or from the root disk image (read-only, with the
    scratch disk and the share directory), the vTPM on tpm-tis, user-net with the two ports forwarded."""
    qemu = (f"-chardev socket,id=chrtpm,path={vm.tpm_socket} -tpmdev emulator,id=tpm0,chardev=chrtpm "
            f"-device tpm-tis,tpmdev=tpm0 "
            f"-netdev user,id=cwnet,hostfwd=tcp:127.0.0.1:{cfg.attest_port}-:{GUEST_PORT},"
            f"hostfwd=tcp:127.0.0.1:{cfg.distcc_port}-:{DISTCC_PORT} -device virtio-net-pci,netdev=cwnet")
    argv = [str(_venv_tool("vng")), "--run", str(vm.kernel), "--disable-microvm", "--force-9p", "--user", "root",
            "--memory", cfg.memory]
    if cfg.disk:        # after virtme-ng's root disk: the root is /dev/vda, the scratch disk the next one
        qemu += (f" -drive if=none,id=cwscratch,file={vm.scratch},format=raw "
                 f"-device virtio-blk-pci,drive=cwscratch,serial={SCRATCH_SERIAL}")
        argv += ["--root-disk", str(vm.disk), "--root-fstype", ROOT_FSTYPE, f"--rodir={GUEST_SHARE}={vm.share}"]
    else:
        argv += ["--cwd", str(vm.root)]
    argv += [f"--qemu-opts={qemu}", f"--append={APPEND}", "--exec", cfg.guest_command()]
    if not kvm_usable():
        argv.insert(3, "--disable-kvm")
    return argv


def qemu_argv(vm: VmDir, cfg: VmConfig) -> list[str]:
    """The qemu argv virtme-ng would run for this VM (`vng --dry-run` prints it and starts nothing), changed in
    two places that are not the kernel's command line: the measured initrd instead of virtme-ng's per-boot
    temporary one, and the guest command's exit status written to the VM's `guest.rc` instead of a temporary
    file. The supervisor runs exactly this argv, so its -append is the guest's /proc/cmdline."""
    argv = vng_argv(vm, cfg)
    argv.insert(1, "--dry-run")
    try:
        # stdin/stdout as the supervisor gives qemu (virtme-run picks its serial setup from them)
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                              env=_tool_env(Path(argv[0])), cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmError(f"VM {vm.name}: cannot run {argv[0]} --dry-run: {exc}", reason="usage", vm=vm.name) from exc
    shown = [shlex.split(line) for line in proc.stdout.splitlines() if "qemu-system" in line.split(" ", 1)[0]]
    if proc.returncode != 0 or not shown:
        raise VmError(f"VM {vm.name}: virtme-ng showed no qemu command line (exit {proc.returncode}): "
                      f"{(proc.stderr or proc.stdout).strip()[-300:]}", reason="usage", vm=vm.name)
    out: list[str] = []
    args = iter(shown[-1])
    for arg in args:
        if arg == "-initrd":
            next(args, None)
            continue
        out.append(f"file,id=ret,path={vm.guest_rc}" if arg.startswith("file,id=ret,path=") else arg)
    out += ["-initrd", str(vm.initrd)]
    _append_of(out, vm.name)            # there is one, and the kernel takes it whole
    return out


def _append_of(argv: Sequence[str], name: str) -> str:
    try:
        cmdline = argv[list(argv).index("-append") + 1]
    except (ValueError, IndexError):
        raise VmError(f"VM {name}: the qemu command line has no -append", reason="usage", vm=name) from None
    if len(cmdline.encode()) >= KERNEL_CMDLINE_SIZE:
        raise VmError(f"VM {name}: the kernel command line is {len(cmdline.encode())} bytes; x86's limit is "
                      f"{KERNEL_CMDLINE_SIZE - 1} (it would be cut): shorten --workload or the data dir's path",
                      reason="usage", vm=name)
    return cmdline


def boot_cmdline(vm: VmDir) -> str:
    """The kernel command line VM `vm` boots with: the -append of the qemu argv its supervisor runs."""
    try:
        argv = json.loads(vm.qemu_argv.read_text())["argv"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VmError(f"{vm.qemu_argv}: no qemu command line ({exc}): `cwlite vm up {vm.name}` writes it",
                      reason="usage", vm=vm.name) from exc
    return _append_of(argv, vm.name)


def make_scratch(path: Path) -> None:
    """A fresh, empty ext4 scratch disk (sparse): nothing a guest wrote there reaches its next boot."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with open(path, "wb") as f:
        f.truncate(SCRATCH_SIZE)
    proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", SCRATCH_SERIAL, str(path)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise VmError(f"{path}: mkfs.ext4 failed (exit {proc.returncode}): {proc.stderr.strip()[-200:]}",
                      reason="boot")


def _start_vtpm(vm: VmDir) -> tuple[subprocess.Popen, Path]:
    sock = vm.tpm_socket
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={vm.vtpm / 'state'}",
                             "--ctrl", f"type=unixio,path={sock}", "--log", f"file={vm.vtpm / 'swtpm.log'},level=1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + _SWTPM_WAIT
    while not sock.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise VmError(f"{vm.vtpm}: swtpm did not create {sock} (log {vm.vtpm / 'swtpm.log'})", reason="boot",
                          vm=vm.name)
        time.sleep(0.05)
    return proc, sock


def _terminate(proc: subprocess.Popen, *, group: bool) -> None:
    """SIGTERM (swtpm saves its state on it), then SIGKILL after a grace period; `group`: its whole group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        try:
            proc.wait(_GRACE)
            return
        except subprocess.TimeoutExpired:
            continue


def _guest_rc(vm: VmDir) -> int | None:
    """The guest command's exit status (virtme-ng's init writes it to the ret port: `guest.rc`); None when the
    guest ended without one (a panic, qemu killed)."""
    try:
        text = vm.guest_rc.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def supervise(root: Path) -> int:
    """Run one VM to its end: swtpm, then qemu (the argv `up` measured); console to console.log; SIGTERM stops
    both (swtpm saves)."""
    vm = VmDir(root.parent.parent, root.name)
    cfg = VmConfig.read(vm.config)
    write_atomic(vm.pidfile, f"{os.getpid()}\n".encode(), mode=0o644)
    children: list[subprocess.Popen] = []

    def stop(*_: object) -> None:
        raise SystemExit(143)               # the finally below stops qemu, then the vTPM

    signal.signal(signal.SIGTERM, stop)
    qemu_rc: int | None = None
    with open(vm.console, "ab", buffering=0) as console:
        try:
            argv = json.loads(vm.qemu_argv.read_text())["argv"]
            boot_cmdline(vm)                # the argv `up` measured, whole
            if cfg.disk:
                make_scratch(vm.scratch)
            swtpm, _sock = _start_vtpm(vm)
            children.append(swtpm)
            # a pipe, never the file itself: qemu re-opens its stdout (VM-TIER.md gotcha 9)
            qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            children.append(qemu)
            write_atomic(vm.qemu_pidfile, f"{qemu.pid}\n".encode(), mode=0o644)
            for line in iter(qemu.stdout.readline, b""):
                console.write(line)
            qemu_rc = qemu.wait()
        except (VmError, OSError, ValueError, KeyError) as exc:
            console.write(f"{FAILED_MARK}: {exc}\n".encode())
        finally:
            for p in reversed(children):    # qemu (its own group) first, then swtpm
                _terminate(p, group=p is not children[0])
            rc = _guest_rc(vm)
            write_atomic(vm.exit_file, json.dumps({"rc": rc, "qemu_rc": qemu_rc, "at": time.time()}).encode(),
                         mode=0o644)
            for f in (vm.pidfile, vm.qemu_pidfile):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
    return 0 if rc == 0 else 1


# down / list / logs ----------------------------------------------------------------------------------
def down(data_dir: Path, name: str, *, timeout: float = 30.0) -> bool:
    """Stop VM `name` (its supervisor's whole session: qemu, then swtpm, which saves the vTPM state).
    False when it was not running."""
    vm = VmDir(Path(data_dir).resolve(), check_vm_name(name))
    pid = running_pid(vm)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):         # the supervisor did not finish: kill its group (swtpm) and qemu's
        groups = [pid]
        with contextlib.suppress(ValueError, FileNotFoundError):
            groups.append(int(vm.qemu_pidfile.read_text()))
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    return True


def status(vm: VmDir) -> dict:
    """One VM's facts for `vm list`."""
    cfg = VmConfig.read(vm.config)
    pid = running_pid(vm)
    try:
        cmdline: str | None = boot_cmdline(vm)
    except VmError:
        cmdline = None                      # never measured (a VM dir from before qemu.json)
    return {"name": vm.name, "state": "running" if pid else "stopped", "pid": pid,
            "attest_url": f"https://127.0.0.1:{cfg.attest_port}", "distcc_port": cfg.distcc_port,
            "dir": str(vm.root), "console": str(vm.console), "pcr": VM_PCR, "root": "disk" if cfg.disk else "host",
            "disk": str(vm.disk) if cfg.disk else None, "cmdline": cmdline}


def list_vms(data_dir: Path) -> list[dict]:
    root = Path(data_dir).resolve() / "vms"
    names = sorted(p.name for p in root.iterdir() if (p / "vm.json").exists()) if root.is_dir() else []
    return [status(VmDir(Path(data_dir).resolve(), n)) for n in names]


def console_path(data_dir: Path, name: str) -> Path:
    vm = VmDir(Path(data_dir).resolve(), check_vm_name(name))
    if not vm.console.exists():
        raise VmError(f"{vm.console}: no console log (was VM {name} ever started here?)", reason="usage", vm=name)
    return vm.console


if __name__ == "__main__":
    if sys.argv[1:2] == ["supervise"] and len(sys.argv) == 3:
        sys.exit(supervise(Path(sys.argv[2])))
    sys.exit("usage: python -m controlplane.host.vmv supervise VM_DIR")
