"""`cwlite vm up|list|down|logs`: the host boots Build VMs measured, with a vTPM, and vouches for them.

`cwlite vm guest-init` is the other end: the first command the VM runs. It
starts cwlite's enforcement and attestation service (`cwlite serve
--enforce`), waits until the engine has logged its start and the service
answers, and only then starts the workload; when enforcement stops, the
guest command ends and the VM powers off (fail closed).
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from controlplane.cli.output import emit
from controlplane.core.errors import EnforcementError, LogError
from controlplane.core.events import EventKind, parse_ima_name
from controlplane.core.paths import DEFAULT_DATA_DIR
from controlplane.host import vmv
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
@click.option("--host-root", is_flag=True, default=True, show_default=True,
              help="The guest's root is the host's / read-only over 9p (the only root supported yet).")
@click.option("--workload", help=f"The guest command started after enforcement (default: distccd on {vmv.DISTCC_PORT}).")
@click.option("--timeout", type=float, default=1800.0, show_default=True, help="Seconds to wait for the VM to be ready.")
@click.option("--json", "as_json", is_flag=True, help="Print the VM's facts as JSON when ready.")
def up(name: str, data_dir: Path, kernel: Path | None, initrd: Path | None, policy: Path | None, db: Path | None,
       host_root: bool, workload: str | None, timeout: float, as_json: bool) -> None:
    """Measure the VM's boot parts and vTPM into this host's log, boot it, wait until cwlite enforces in it.

    Needs `cwlite serve` running on the same --data-dir (it holds the host's
    measurement log). Started again after `vm down`, the VM keeps its vTPM.
    The measured command line is the one the guest kernel gets (`vm list
    --json`'s cmdline is its /proc/cmdline).
    """
    say = (lambda line: click.echo(line, err=True))
    facts = vmv.up(data_dir, name, kernel=kernel, initrd=initrd, policy=policy, db=db, workload=workload,
                   timeout=timeout, say=say)
    emit(facts, as_json, lambda d: click.echo(f"{d['name']}: running (pid {d['pid']}), attestation {d['attest_url']}, "
                                              f"distccd 127.0.0.1:{d['distcc_port']}"))


@vm.command("initrd")
@click.option("--kernel", required=True, type=_FILE, help="The kernel image the VM boots.")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def initrd(kernel: Path, out: Path) -> None:
    """Build the initrd `vm up` boots for KERNEL when given no --initrd (virtme-ng's initramfs; the same
    inputs give the same bytes): a verifier's reference for `verify --via ... --vm-initrd OUT`."""
    vmv.build_initrd(kernel, out)
    click.echo(f"{out}: {vmv.sha256_file(out).hex()}", err=True)


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


@vm.command("guest-init", hidden=True)
@click.option("--policy", required=True, type=_FILE)
@click.option("--db", required=True, type=_FILE)
@click.option("--pcr", type=click.IntRange(0, 23), default=vmv.VM_PCR)
@click.option("--port", type=click.IntRange(1, 65535), default=vmv.GUEST_PORT)
@click.option("--workload", required=True)
def guest_init(policy: Path, db: Path, pcr: int, port: int, workload: str) -> None:
    """In the VM, first: enforcement + attestation service, then (only then) the workload."""
    print(vmv.BOOTED_MARK, flush=True)
    # what the kernel was booted with: the host measured this very string (`vm list --json`'s cmdline)
    print(f"{vmv.CMDLINE_MARK} {Path('/proc/cmdline').read_text().rstrip(chr(10))}", flush=True)
    _configure_network()
    print(f"[cwlite-vm] the host root read-only, direct (overlays taken away: {' '.join(vmv.uncover_host_root()) or '-'})",
          flush=True)
    data = Path(vmv.GUEST_DATA)
    data.mkdir(parents=True, exist_ok=True)
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
