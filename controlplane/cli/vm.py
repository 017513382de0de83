"""`cwlite vm up|list|down|logs`: the host boots Build VMs measured, with a vTPM, and vouches for them.

`cwlite vm image` builds a root disk image for `vm up --disk`
(controlplane.host.vmimage).

`cwlite vm guest-init` is the other end: the first command the VM runs. It
starts cwlite's enforcement and attestation service (`cwlite serve
--enforce`), waits until the engine has logged its start and the service
answers, and only then starts the workload; when enforcement stops, the
guest command ends and the VM powers off (fail closed).
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from controlplane.cli.output import emit
from controlplane.core.digest import sha256_file
from controlplane.core.errors import EnforcementError, LogError
from controlplane.core.events import EventKind, parse_ima_name
from controlplane.core.paths import DEFAULT_DATA_DIR
from controlplane.host import vmimage, vmv
from controlplane.host.mlog import read_log

_DATA = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR,
                     show_default=True, help="The host's data dir (the one `cwlite serve` uses).")
_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)
_START_TIMEOUT = 1500.0     # a bcc compile under software emulation: 10 s idle, minutes on a loaded host


@click.group("vm")
def vm() -> None:
    """Build VMs booted by this host: measured boot parts, a vTPM each, cwlite enforcing from the first process.

    \b
    Examples:
      # boot build1 over the host's root fs; the host's log records kernel, cmdline, policy and the vTPM
      cwlite vm up build1 --kernel /boot/vmlinuz-6.1.0-57-amd64 --policy vm.toml --db vm.db --host-root
      # a root disk image with cwlite (`make deb`) and distcc, and the VM's DB from the image's own files
      cwlite vm image vm.img --kernel /boot/vmlinuz-6.1.0-57-amd64 --deb build/deb/cwlite_0.1.0-1_amd64.deb --db vm.db
      cwlite vm up build2 --kernel /boot/vmlinuz-6.1.0-57-amd64 --policy vm.toml --db vm.db --disk vm.img
      cwlite vm list --json
      # the verifier's reference initrd for that kernel (what `vm up` measured and booted)
      cwlite vm initrd --kernel /boot/vmlinuz-6.1.0-57-amd64 vm-initrd.img
      cwlite vm logs build1
      # stop it; `vm up build1` again restarts it on the same vTPM
      cwlite vm down build1
    """


@vm.command("up")
@click.argument("name")
@_DATA
@click.option("--kernel", type=_FILE, help="Kernel image to boot (copied into the VM's dir; required the first time).")
@click.option("--initrd", type=_FILE, help="Initrd to boot (copied into the VM's dir); default: virtme-ng's "
              "initramfs for the kernel, built once (`cwlite vm initrd`).")
@click.option("--policy", type=_FILE, help="The VM's cwlite policy (required the first time).")
@click.option("--db", type=_FILE, help="The VM's measurement DB (required the first time).")
@click.option("--disk", type=_FILE, help="Boot from this root disk image (`cwlite vm image`; copied into the VM's "
              "dir, measured as a fifth boot part, attached read-only, with a fresh scratch disk on /tmp each boot).")
@click.option("--host-root", is_flag=True, help="The guest's root is the host's / read-only over 9p (the default "
              "for a new VM; given to a VM made with --disk, it boots over the host's root from then on).")
@click.option("--workload", help=f"The guest command started after enforcement (default: distccd on {vmv.DISTCC_PORT}).")
@click.option("--timeout", type=float, default=1800.0, show_default=True, help="Seconds to wait for the VM to be ready.")
@click.option("--json", "as_json", is_flag=True, help="Print the VM's facts as JSON when ready.")
def up(name: str, data_dir: Path, kernel: Path | None, initrd: Path | None, policy: Path | None, db: Path | None,
       disk: Path | None, host_root: bool, workload: str | None, timeout: float, as_json: bool) -> None:
    """Measure the VM's boot parts and vTPM into this host's log, boot it, wait until cwlite enforces in it.

    Needs `cwlite serve` running on the same --data-dir (it holds the host's
    measurement log). Started again after `vm down`, the VM keeps its vTPM and
    its root (the host's, or its disk image). The measured command line is the
    one the guest kernel gets (`vm list --json`'s cmdline is its /proc/cmdline).
    """
    say = (lambda line: click.echo(line, err=True))
    facts = vmv.up(data_dir, name, kernel=kernel, initrd=initrd, policy=policy, db=db, disk=disk, host_root=host_root,
                   workload=workload, timeout=timeout, say=say)
    emit(facts, as_json, lambda d: click.echo(f"{d['name']}: running (pid {d['pid']}), attestation {d['attest_url']}, "
                                              f"distccd 127.0.0.1:{d['distcc_port']}"))


@vm.command("initrd")
@click.option("--kernel", required=True, type=_FILE, help="The kernel image the VM boots.")
@click.option("--disk", "disk_root", is_flag=True, help="The initrd of a VM booted from a disk image (`vm up --disk`).")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def initrd(kernel: Path, disk_root: bool, out: Path) -> None:
    """Build the initrd `vm up` boots for KERNEL when given no --initrd (virtme-ng's initramfs; the same
    inputs give the same bytes): a verifier's reference for `verify --via ... --vm-initrd OUT`."""
    vmv.build_initrd(kernel, out, disk=disk_root)
    click.echo(f"{out}: {sha256_file(out).hex()}", err=True)


@vm.command("image")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@_DATA
@click.option("--deb", required=True, type=_FILE, help="cwlite's Debian package to install (`make deb`: "
              "build/deb/cwlite_*_amd64.deb).")
@click.option("--kernel", required=True, type=_FILE, help="The kernel image the VM will boot: its release's "
              "headers (linux-headers-RELEASE) go into the image for bcc.")
@click.option("--package", "packages", multiple=True, metavar="PKG",
              help=f"A Debian package the workload needs (repeatable; default: {' '.join(vmimage.WORKLOAD_PACKAGES)}).")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the VM's measurement DB: the --package packages and their dependencies, measured "
                   "from the image's own files (checked against the image's dpkg md5sums).")
@click.option("--trust-set", default="build", show_default=True, help="With --db: the trust set they go into.")
@click.option("--suite", default=vmimage.SUITE, show_default=True, help="Debian suite to debootstrap.")
@click.option("--mirror", default=vmimage.MIRROR, show_default=True, help="Debian mirror.")
@click.option("--security-mirror", default=vmimage.SECURITY_MIRROR, show_default=True, help="Debian security mirror.")
@click.option("--json", "as_json", is_flag=True, help="Print the image's facts as JSON.")
def image(out: Path, data_dir: Path, deb: Path, kernel: Path, packages: tuple[str, ...], db: Path | None,
          trust_set: str, suite: str, mirror: str, security_mirror: str, as_json: bool) -> None:
    """Build a Build VM's root disk image OUT (ext4) for `vm up --disk`: Debian, cwlite, bcc, the kernel's headers.

    debootstrap (minbase) into DATA_DIR/vm-images/OUT.tree, then in a chroot
    apt installs the cwlite package's dependencies (Python, bcc), the headers
    of KERNEL's release, iproute2, udev and the workload's packages; no
    service starts in the chroot. The tree is kept: a later build with the
    same suite, mirrors, release and packages reuses it and only reinstalls
    the cwlite package. Then `mkfs.ext4 -d` makes the image (no loop mount).
    Root only. A first build fetches about 180 MB (3-4 minutes here); a
    build on a kept tree takes about 25 s.

    \b
    Examples:
      cwlite vm image vm.img --kernel /boot/vmlinuz-6.1.0-57-amd64 --deb build/deb/cwlite_0.1.0-1_amd64.deb
      # the VM's DB from the image's own distcc and its libraries
      cwlite vm image vm.img --kernel /boot/vmlinuz-6.1.0-57-amd64 --deb cwlite.deb --db vm.db
      # more workload packages (each also trusted in --db)
      cwlite vm image vm.img --kernel vmlinuz --deb cwlite.deb --package distcc --package make --db vm.db
      # the verifier's references for `cwlite verify VM --via HOST --vm-disk vm.img`
      sha256sum vm.img
    """
    spec = vmimage.ImageSpec(deb=deb.resolve(), kernel_release=vmimage.kernel_release(kernel),
                             packages=packages or vmimage.WORKLOAD_PACKAGES, suite=suite, mirror=mirror,
                             security_mirror=security_mirror)
    facts = vmimage.build_image(out, spec, data_dir, db=db, trust_set=trust_set, say=lambda line: click.echo(line, err=True))
    facts["sha256"] = sha256_file(out).hex()
    emit(facts, as_json, lambda d: click.echo(f"{d['image']}: {d['bytes'] >> 20} MiB, sha256 {d['sha256']}"))


@vm.command("list")
@_DATA
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(data_dir: Path, as_json: bool) -> None:
    """The VMs of this host, running or stopped."""
    vms = vmv.list_vms(data_dir)
    if as_json:
        emit({"vms": vms}, True, print)
        return
    for d in vms:
        click.echo(f"{d['name']:<20} {d['state']:<8} {d['attest_url'] or '-':<28} distcc {d['distcc_port']}")


@vm.command("down")
@click.argument("name")
@_DATA
def down(name: str, data_dir: Path) -> None:
    """Stop the VM (qemu, then its swtpm, which saves the vTPM state for the next `vm up`)."""
    click.echo(f"{name}: {'stopped' if vmv.down(data_dir, name) else 'was not running'}", err=True)


@vm.command("logs")
@click.argument("name")
@_DATA
@click.option("--tail", type=click.IntRange(1), help="Only the last N lines.")
def logs(name: str, data_dir: Path, tail: int | None) -> None:
    """The VM's console (kernel, cwlite's early start, the workload's output)."""
    lines = vmv.console_path(data_dir, name).read_text(errors="replace").splitlines()
    click.echo("\n".join(lines[-tail:] if tail else lines))


# the guest's side ------------------------------------------------------------------------------------
def _configure_network() -> None:
    """qemu user-net's fixed addresses: the guest is 10.0.2.15, the gateway 10.0.2.2 (no DHCP wait)."""
    deadline = time.monotonic() + 60
    while True:
        nics = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
        if nics or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    cmds = [["ip", "link", "set", "lo", "up"]]
    if nics:
        cmds += [["ip", "addr", "add", "10.0.2.15/24", "dev", nics[0]], ["ip", "link", "set", nics[0], "up"],
                 ["ip", "route", "add", "default", "via", "10.0.2.2"]]
    for cmd in cmds:
        subprocess.run(cmd, check=False, capture_output=True)


def _enforcing(log_path: Path) -> bool:
    """The engine logged its start and loaded its policy and DB (the service's TLS key is logged before)."""
    try:
        kinds = {getattr(parse_ima_name(e.digest, e.name), "kind", None) for e in read_log(log_path)}
    except LogError:
        return False
    return {EventKind.DAEMON_START, EventKind.POLICY_LOAD, EventKind.DB_LOAD} <= kinds


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _mount_scratch(serial: str, at: str = "/tmp") -> str:
    """The disk VM's scratch disk (the virtio-blk device whose serial is `serial`, ext4 made by the host for this
    boot) mounted on `at`, world-writable with the sticky bit as /tmp is; its device."""
    found = [d.name for d in sorted(Path("/sys/block").iterdir())
             if (d / "serial").exists() and (d / "serial").read_text().strip() == serial]
    if not found:
        raise EnforcementError(f"guest-init: no block device with serial {serial!r} (the scratch disk) in /sys/block")
    dev = f"/dev/{found[0]}"
    proc = subprocess.run(["mount", "-t", "ext4", "-o", "nosuid,nodev", dev, at], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EnforcementError(f"guest-init: cannot mount the scratch disk {dev} on {at}: {proc.stderr.strip()}")
    os.chmod(at, 0o1777)
    return dev


@vm.command("guest-init", hidden=True)
@click.option("--policy", required=True, type=_FILE)
@click.option("--db", required=True, type=_FILE)
@click.option("--pcr", type=click.IntRange(0, 23), default=vmv.VM_PCR)
@click.option("--port", type=click.IntRange(1, 65535), default=vmv.GUEST_PORT)
@click.option("--root", "root_kind", type=click.Choice(["host", "disk"]), default="host",
              help="host: the host's root over 9p; disk: a root disk image (read-only ext4).")
@click.option("--scratch", metavar="SERIAL", help="With --root disk: the scratch disk's virtio serial (mounted on /tmp).")
@click.option("--workload", required=True)
def guest_init(policy: Path, db: Path, pcr: int, port: int, root_kind: str, scratch: str | None, workload: str) -> None:
    """In the VM, first: enforcement + attestation service, then (only then) the workload."""
    print(vmv.BOOTED_MARK, flush=True)
    # what the kernel was booted with: the host measured this very string (`vm list --json`'s cmdline)
    print(f"{vmv.CMDLINE_MARK} {Path('/proc/cmdline').read_text().rstrip(chr(10))}", flush=True)
    _configure_network()
    # virtme-ng's overlays go over a disk root as over the host's: the same reason to take them away
    uncovered = " ".join(vmv.uncover_host_root()) or "-"
    if root_kind == "disk":
        dev = _mount_scratch(scratch) if scratch else "-"
        print(f"[cwlite-vm] the root disk read-only, direct (overlays taken away: {uncovered}; scratch {dev} on /tmp)",
              flush=True)
    else:
        print(f"[cwlite-vm] the host root read-only, direct (overlays taken away: {uncovered})", flush=True)
    data = Path(vmv.GUEST_DATA)
    data.mkdir(parents=True, exist_ok=True)
    if root_kind == "disk":
        # the share is read-only 9p, and the DB is opened for writing (WAL): the engine reads copies on tmpfs
        # (the same bytes: the policy-load and db-load entries carry their digests)
        copies = data / "vm-files"
        copies.mkdir(exist_ok=True)
        shutil.copyfile(policy, copies / policy.name)
        shutil.copyfile(db, copies / db.name)
        policy, db = copies / policy.name, copies / db.name
    serve = subprocess.Popen([sys.executable, "-m", "controlplane.cli", "serve", "--enforce", "--backend", "lsm",
                              "--policy", str(policy.resolve()), "--db", str(db.resolve()), "--data-dir", str(data),
                              "--host", "0.0.0.0", "--port", str(port), "--pcr", str(pcr)])
    deadline = time.monotonic() + _START_TIMEOUT
    while not (_enforcing(data / "measurements.log") and _answers(port)):
        if serve.poll() is not None or time.monotonic() > deadline:
            print(f"{vmv.FAILED_MARK}: cwlite serve {'exited ' + str(serve.returncode) if serve.poll() is not None else 'did not start'}"
                  " before the workload: the workload is not started", flush=True)
            serve.kill()
            raise EnforcementError("guest-init: enforcement did not start")
        time.sleep(0.2)
    print(vmv.ENFORCING_MARK, flush=True)
    work = subprocess.Popen(shlex.split(workload))
    print(f"{vmv.READY_MARK} (workload pid {work.pid})", flush=True)
    rc = serve.wait()             # enforcement gone: end the guest command, the VM powers off
    work.kill()
    print(f"{vmv.FAILED_MARK}: cwlite serve exited {rc}; powering off", flush=True)
    sys.exit(1)
