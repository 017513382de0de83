"""The VMV end to end on this host: `cwlite vm up` boots a Build VM, the verifier judges it through the host.

The host is the demo slice (tracepoint enforcement + swtpm + HTTPS service, the
control socket `vm up` records through); the VM is Debian's kernel under qemu
(software emulation) over the host's root, with its own swtpm vTPM, running
`cwlite serve --enforce --backend lsm` before its distccd workload. Every boot
costs one to several minutes here, so the module boots ONCE for the
chain, the early-start, the measured cmdline (the guest's /proc/cmdline), the
swapped-reference cases (kernel, initrd, policy) and the TP's untrusted exec
(which leaves the VM untrusted), and once more for the restart; the
copied-vTPM refusal needs no boot. A second VM boots once from a root disk
image (`cwlite vm image`, built once per run: debootstrap and apt in a
chroot) for the disk cases (`-k disk` selects them alone).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from controlplane.cli.demo import Demo, Layout, prepare
from controlplane.core import proof as proof_mod
from controlplane.core.digest import sha256_file
from controlplane.core.errors import VerifyError
from controlplane.core.events import EventKind
from controlplane.core.keys import load_signing_key
from controlplane.core.policy import load_policy
from controlplane.core.vmrecord import NO_PART, cmdline_digest
from controlplane.host import vmimage, vmv
from controlplane.verifier import chain
from controlplane.verifier.judge import Reference
from prima.measuredb import MeasureDB
from prima.sources import build
from tests.conftest import requires
from tests.vm.harness import ensure_deb, find_kernel

pytestmark = [requires(root=True, tool="qemu-system-x86_64"), requires(tool="swtpm"), requires(tool="distccd"),
              pytest.mark.timeout(3000)]

VM = "vmv1"
HOST = "build-vm-1"          # the demo host's enrolled name
VM_POLICY = """\
mode = "audit"
backend = "lsm"
pcr = 11
trust_sets = ["build"]

[labels.tp_distcc]
entrypoints = ["/usr/bin/distccd"]
trust_set = "build"

[[port_authority.rules]]
port = 3632
protocol = "tcp"
labels = ["tp_distcc"]
"""


def cwlite(*args: str, timeout: float = 2500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class Site:
    """The host (demo slice), the VM's files and the verifier's copies."""

    layout: Layout
    demo: Demo
    kernel: Path
    initrd: Path                  # the verifier's own rebuild of the initrd `vm up` builds for the kernel
    vm_policy: Path
    vm_db: Path
    up: subprocess.CompletedProcess
    name: str = VM
    disk: Path | None = None      # the root disk image the VM booted (`vm up --disk`)

    @property
    def data(self) -> Path:
        return self.layout.host_dir

    def facts(self) -> dict:
        out = cwlite("vm", "list", "--json", "--data-dir", str(self.data))
        assert out.returncode == 0, out.stderr
        return {v["name"]: v for v in json.loads(out.stdout)["vms"]}[self.name]

    def boot_reference(self, kernel: Path | None = None, initrd: Path | None = None,
                       disk: Path | None = None) -> dict[str, bytes]:
        ref = {"kernel": sha256_file(kernel or self.kernel), "initrd": sha256_file(initrd or self.initrd),
               "cmdline": cmdline_digest(self.facts()["cmdline"])}
        disk = disk or self.disk
        return ref | ({"disk": sha256_file(disk)} if disk else {})

    def attest(self, *, kernel: Path | None = None, initrd: Path | None = None, vm_policy: Path | None = None,
               disk: Path | None = None, boot: dict[str, bytes] | None = None) -> chain.ChainAttestation:
        host_ref = Reference(load_policy(self.layout.verifier_policy), MeasureDB.open(self.layout.verifier_db))
        vm_ref = Reference(load_policy(vm_policy or self.vm_policy), MeasureDB.open(self.vm_db))
        try:
            return chain.attest_via(self.name, self.demo.store.host(HOST), host_ref, vm_ref,
                                    boot or self.boot_reference(kernel, initrd, disk), self.demo.key, store=self.demo.store)
        finally:
            host_ref.db.close()
            vm_ref.db.close()

    def console(self) -> str:
        out = cwlite("vm", "logs", self.name, "--data-dir", str(self.data))
        assert out.returncode == 0, out.stderr
        return out.stdout

    def guest_cmdline(self) -> str:
        """What the guest's guest-init read from /proc/cmdline, as it printed it."""
        seen = [line.split(vmv.CMDLINE_MARK + " ", 1)[1] for line in self.console().splitlines()
                if line.startswith(vmv.CMDLINE_MARK + " ")]
        assert len(seen) == 1, seen
        return seen[0]

    def host_entry(self, part: str) -> bytes:
        """The digest of the host log's last vm-part entry for `part` of this VM."""
        return [e.digest for e in self.demo.running.log.entries(0)
                if e.name == f"cwlite:vm-part:-:{part}:{self.name}"][-1]

    def qemu(self) -> list[str]:
        """The running qemu's argv (the VM's, by its directory)."""
        root = str(vmv.VmDir(self.data.resolve(), self.name).root)
        found = [argv for argv in _cmdlines() if argv and "qemu-system" in argv[0] and root in " ".join(argv)]
        assert len(found) == 1, found
        return found[0]


def _cmdlines() -> Iterator[list[str]]:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                yield [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")[:-1]]
            except OSError:
                continue


def vm_up(site_data: Path, *extra: str, name: str = VM) -> subprocess.CompletedProcess:
    return cwlite("vm", "up", name, "--data-dir", str(site_data), "--timeout", "2400", *extra)


@dataclass
class HostSite:
    """The demo host (enforcing, attested, enrolled as HOST) that boots the module's VMs."""

    layout: Layout
    demo: Demo
    work: Path


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostSite]:
    work = tmp_path_factory.mktemp("vmv")
    layout = prepare(work)
    with Demo.start(layout) as demo:
        demo.enrol(HOST)
        yield HostSite(layout, demo, work)


@pytest.fixture(scope="module")
def site(host: HostSite) -> Iterator[Site]:
    vm_dir = host.work / "vm-files"
    vm_dir.mkdir()
    policy, db = vm_dir / "vm.toml", vm_dir / "vm.db"
    policy.write_text(VM_POLICY)
    build(db, from_dpkg=["distcc"], trust_set="build", note="the Build VM's distccd and its libraries")
    kernel = find_kernel()
    initrd = vm_dir / "initrd.img"
    vmv.build_initrd(kernel, initrd)          # the verifier's reference, built apart from the VM's copy
    up = vm_up(host.layout.host_dir, "--kernel", str(kernel), "--policy", str(policy), "--db", str(db))
    try:
        assert up.returncode == 0, f"vm up failed: {up.stderr[-3000:]}"
        yield Site(host.layout, host.demo, kernel, initrd, policy, db, up)
    finally:
        cwlite("vm", "down", VM, "--data-dir", str(host.layout.host_dir), timeout=120)


def test_vm_up_measures_then_boots_and_reports_progress(site: Site) -> None:
    lines = site.up.stderr.splitlines()
    logged = [line for line in lines if line.startswith("host log entry")]
    assert [line.split(": ", 1)[1].split(":")[1:4] for line in logged] == [
        ["vm-part", "-", "kernel"], ["vm-part", "-", "initrd"], ["vm-part", "-", "cmdline"], ["vm-part", "-", "policy"],
        ["vm-vtpm", "-", "create"]]
    progress = [line for line in lines if line.startswith("[")]
    assert any("enforcing" in p for p in progress) and progress[-1].endswith("ready")
    assert lines.index(logged[-1]) < lines.index(progress[0])         # vouched for before it booted
    facts = site.facts()
    assert facts["state"] == "running" and facts["pid"] and facts["pcr"] == vmv.VM_PCR
    # the host's committed log holds exactly those entries, in its PCR
    names = [e.name for e in site.demo.running.log.entries(0)]
    assert f"cwlite:vm-part:-:kernel:{VM}" in names and any(n.startswith(f"cwlite:vm-vtpm:-:create:{VM},") for n in names)
    text = site.console()
    assert text.index(vmv.BOOTED_MARK) < text.index(vmv.ENFORCING_MARK) < text.index(vmv.READY_MARK)


def test_the_measured_cmdline_is_the_guests_proc_cmdline(site: Site) -> None:
    """The exact string the guest kernel got (virtme-ng's overlay list and init path included) is what
    `vm list` shows, what the running qemu's -append holds, and what the host log's cmdline entry measures."""
    guest = site.guest_cmdline()
    assert guest == site.facts()["cmdline"]
    argv = site.qemu()
    assert argv[argv.index("-append") + 1] == guest
    assert site.host_entry("cmdline") == cmdline_digest(guest)
    # virtme-ng's own additions are in it: its init path and overlays, and the guest command (base64)
    assert "virtme_rw_overlay0=" in guest and "init=" in guest and "virtme.exec=" in guest


def test_trusted_through_the_host_chain_and_enforcing_before_the_workload(site: Site) -> None:
    att = site.attest()
    assert att.verdict == "trusted", att.reasons
    assert att.host.verdict == "trusted"
    kinds = [v.kind for v in att.entries]
    # the VM's own log: its boot aggregate, then cwlite (service key, engine start, policy, DB) before anything else
    assert kinds[0] == EventKind.BOOT_AGGREGATE.value
    start = kinds.index(EventKind.DAEMON_START.value)
    assert kinds[start + 1: start + 3] == [EventKind.POLICY_LOAD.value, EventKind.DB_LOAD.value]
    assert not set(kinds[:start]) & chain.WORKLOAD_KINDS
    # the workload, exec'd from the 9p root, entered its label and its code was judged (issue 25)
    enter = [v for v in att.entries if v.kind == EventKind.LABEL_TRANSITION.value]
    assert [(v.label, v.subject) for v in enter] == [("tp_distcc", "/usr/bin/distccd")], enter
    loads = {v.subject for v in att.entries if v.kind == EventKind.TRUSTED_LOAD.value and v.label == "tp_distcc"}
    assert "/usr/bin/distccd" in loads and any("libc.so" in s for s in loads), loads
    # both links are in the signed proof: the host's own signed proof, and the host-log entries naming the VM
    pub = load_signing_key(site.layout.verifier_dir / "verifier.key").public_key()
    doc = proof_mod.check(att.proof, pub)
    via = doc["via"]
    host_doc = proof_mod.check(via["host_proof"].encode(), pub)
    assert host_doc["verdict"] == "trusted" and host_doc["host"]["name"] == HOST
    assert via["vm_ak_sha256"] == doc["host"]["ak_sha256"]            # the VM's quotes verified with the vouched AK
    assert via["vtpm_entry"]["op"] == "create" and via["vtpm_entry"]["index"] < host_doc["log"]["end"]
    assert via["parts"]["kernel"]["digest"] == hashlib.sha256(site.kernel.read_bytes()).hexdigest()
    # the initrd the host logged is the one qemu booted (its last -initrd), and the verifier's own rebuild
    vm = vmv.VmDir(site.data.resolve(), VM)
    assert via["parts"]["initrd"]["digest"] == sha256_file(vm.initrd).hex() == sha256_file(site.initrd).hex()
    assert via["parts"]["initrd"]["digest"] != NO_PART.hex()
    qemu = site.qemu()
    assert [qemu[i + 1] for i, a in enumerate(qemu) if a == "-initrd"] == [str(vm.initrd)]
    assert "disk" not in via["parts"]
    proof_mod.check_quote(doc)
    proof_mod.check_quote(host_doc)


@pytest.mark.parametrize("part", ["kernel", "initrd"])
def test_a_swapped_boot_file_fails_the_chain_naming_its_entry(site: Site, tmp_path: Path, part: str) -> None:
    """The host booted a kernel (initrd) file other than the one the verifier expects (here: the verifier's
    copy is the other file; the host log's entry disagrees with it either way)."""
    booted: Path = getattr(site, part)
    other = tmp_path / f"{part}-other"
    other.write_bytes(booted.read_bytes() + b"\0")
    att = site.attest(**{part: other})
    assert att.verdict == "untrusted"
    entry = json.loads(att.proof)["via"]["parts"][part]["index"]
    assert att.reasons == (f"host log entry {entry} ({part} of VM {VM}): {sha256_file(booted).hex()[:16]} "
                           f"is not the verifier's {part} {sha256_file(other).hex()[:16]}",)


def test_a_changed_policy_fails_naming_the_policy(site: Site, tmp_path: Path) -> None:
    changed = tmp_path / "vm.toml"
    changed.write_text(VM_POLICY.replace('mode = "audit"', 'mode = "enforce"'))
    att = site.attest(vm_policy=changed)
    assert att.verdict == "untrusted"
    policy_entry = json.loads(att.proof)["via"]["parts"]["policy"]["index"]
    assert att.reasons[0].startswith(f"host log entry {policy_entry} (policy of VM {VM}):")
    # the VM's own policy-load entry is named too
    assert [e["reason"] for e in json.loads(att.proof)["entries"]] == ["policy"]


def test_an_untrusted_exec_by_the_tp_is_a_violation_in_the_vms_proof(site: Site, tmp_path: Path) -> None:
    """A compile job through the VM's forwarded distccd port: distccd (tp_distcc, entered from the 9p root)
    runs gcc, which the VM's DB (distcc and its dependencies) does not trust. Audit mode lets it run; the
    VM's proof through the host chain is untrusted, naming the exec. (After this the VM stays untrusted
    until it reboots: the restart test, last, boots it again.)"""
    (tmp_path / "distcc").mkdir()
    src = tmp_path / "hello.c"
    src.write_text("int main(void) { return 0; }\n")
    env = dict(os.environ, DISTCC_HOSTS=f"127.0.0.1:{site.facts()['distcc_port']}/1", DISTCC_FALLBACK="0",
               DISTCC_SKIP_LOCAL_RETRY="1", DISTCC_DIR=str(tmp_path / "distcc"))
    job = subprocess.run(["distcc", "gcc", "-c", str(src), "-o", str(tmp_path / "hello.o")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert job.returncode == 0 and (tmp_path / "hello.o").exists(), job.stderr[-2000:]
    att = site.attest()
    assert att.verdict == "untrusted" and att.host.verdict == "trusted"
    gcc = [v for v in att.entries if v.kind == EventKind.VIOLATION.value and v.label == "tp_distcc"
           and v.op == "exec" and "gcc" in v.subject]
    assert gcc, [v for v in att.entries if v.verdict != "trusted"]
    listed = [e for e in json.loads(att.proof)["entries"] if e["kind"] == EventKind.VIOLATION.value]
    assert gcc[0].index in {e["index"] for e in listed}


def test_a_vtpm_state_copied_to_another_host_is_refused(tmp_path: Path) -> None:
    """No boot: host A makes the VM's vTPM (swtpm_setup, AK) and its record; the VM's directory copied to
    host B, which has no record of that vTPM, is refused by `vm up` before anything is logged or booted.
    (The verifier's side, a VM its host never vouched for: tests/unit/test_vmrecord.py, no-host-record.)"""
    source, dest = tmp_path / "hostA", tmp_path / "hostB"
    vm = vmv.VmDir(source, VM)
    vm.root.mkdir(parents=True)
    ek, ak, op = vmv.prepare_vtpm(vm, say=lambda _line: None)
    assert op == "create" and json.loads(vm.record_file.read_text())["ak_sha256"] == hashlib.sha256(ak).hexdigest()
    assert vmv.prepare_vtpm(vm, say=lambda _line: None) == (ek, ak, "restart")     # host A's own state: reused
    shutil.copytree(vm.root, dest / "vms" / VM)
    policy = tmp_path / "vm.toml"
    policy.write_text(VM_POLICY)
    r = vm_up(dest, "--kernel", str(find_kernel()), "--policy", str(policy), "--db", str(policy))
    assert r.returncode == 1
    assert "no record of" in r.stderr and str(dest / "vm-records" / f"{VM}.json") in r.stderr
    assert "host log entry" not in r.stderr and "booting" not in r.stderr       # refused before logging or booting
    assert not (dest / "vms" / VM / "supervisor.pid").exists()


def test_restart_keeps_the_vtpm_and_passes_without_re_enrolment(site: Site) -> None:
    """Last: it reboots the module's VM. A new boot of the same vTPM (EK/AK), a `restart` record in the
    host's log, and the chain verifies with nothing enrolled for the VM."""
    first = site.attest()            # untrusted after the violation test: a restart starts a fresh log
    down = cwlite("vm", "down", VM, "--data-dir", str(site.data), timeout=120)
    assert down.returncode == 0 and site.facts()["state"] == "stopped"
    again = vm_up(site.data)                      # no --kernel/--policy/--db: the VM's own copies
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused" in again.stderr
    second = site.attest()
    assert second.verdict == "trusted", second.reasons
    d1, d2 = json.loads(first.proof), json.loads(second.proof)
    assert d2["via"]["vtpm_entry"]["op"] == "restart"
    assert d2["via"]["vtpm_entry"]["index"] > d1["via"]["vtpm_entry"]["index"]
    assert d2["host"]["ak_sha256"] == d1["host"]["ak_sha256"] and d2["host"]["ek_sha256"] == d1["host"]["ek_sha256"]
    # a new boot of the same vTPM: its reset count moved on and the VM's log started over at its boot aggregate
    assert d2["quote_info"]["reset_count"] > d1["quote_info"]["reset_count"]
    assert d2["log"]["start"] == 0 and second.entries[0].kind == EventKind.BOOT_AGGREGATE.value
    assert [h.name for h in site.demo.store.hosts()] == [HOST]           # the VM was never enrolled


# a Build VM booted from a root disk image ------------------------------------------------------------
VM2 = "vmv2"


@dataclass
class Image:
    """`cwlite vm image`'s result: the image, the VM's DB from its files, the build's facts and progress."""

    path: Path
    db: Path
    facts: dict
    progress: list[str]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Built once per run (debootstrap and apt in a chroot: several minutes, most of it the first fetch);
    CWLITE_VM_IMAGE_CACHE=DIR keeps the base tree there for the next run (only the cwlite package is then
    reinstalled). The package is this checkout's (`make deb` when build/deb has none)."""
    work = tmp_path_factory.mktemp("vm-image")
    deb = ensure_deb(work / "make-deb.log")
    assert deb is not None, f"no cwlite package: `make deb` failed (see {work / 'make-deb.log'})"
    cache = Path(os.environ.get("CWLITE_VM_IMAGE_CACHE") or work)
    spec = vmimage.ImageSpec(deb=deb, kernel_release=vmimage.kernel_release(find_kernel()))
    progress: list[str] = []
    out, db = work / "vm.img", work / "vm.db"
    facts = vmimage.build_image(out, spec, cache, db=db, say=progress.append)
    return Image(out, db, facts, progress)


def _debugfs_cat(image: Path, path: str) -> bytes:
    """A file's bytes as the ext4 image holds them (e2fsprogs' debugfs: no mount)."""
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout, proc.stderr[-500:]
    return proc.stdout


def test_disk_image_holds_cwlite_bcc_the_kernel_headers_and_the_workload(image: Image) -> None:
    """The image is ext4 with the guest's needs in it, and the VM's DB trusts the image's own distccd and
    libraries (the bytes in the image, read back with debugfs), not the host's."""
    with open(image.path, "rb") as f:
        f.seek(1024 + 0x38)
        assert f.read(2) == b"\x53\xef"                              # ext4's superblock magic
    tree = Path(image.facts["tree"])
    release = vmimage.kernel_release(find_kernel())
    assert (tree / "usr/bin/cwlite").is_file() and (tree / "usr/bin/distccd").is_file()
    assert (tree / f"usr/src/linux-headers-{release}/include").is_dir()
    assert (tree / "usr/lib/python3/dist-packages/bcc/__init__.py").is_file()
    assert (tree / vmv.GUEST_SHARE.lstrip("/")).is_dir()          # where the guest sees the VM's policy and DB
    assert not (tree / "usr/sbin/policy-rc.d").exists()           # services were kept down only while building
    assert any(line.startswith("mkfs.ext4 -d") for line in image.progress)
    with MeasureDB.open(image.db) as db:
        for path in ("/usr/bin/distccd", "/lib/x86_64-linux-gnu/libc.so.6"):
            # the path dpkg lists, resolved inside the tree (merged /usr: /lib is a relative link to usr/lib)
            real = (tree / path.lstrip("/")).resolve().relative_to(tree.resolve())
            digest = hashlib.sha256(_debugfs_cat(image.path, f"/{real}")).digest()
            assert db.is_trusted(digest, "build"), path
            assert any(m.origin == "dpkg" and m.path == path for m in db.lookup(digest)), path


@pytest.fixture(scope="module")
def disk_site(host: HostSite, image: Image) -> Iterator[Site]:
    vm_dir = host.work / "vm2-files"
    vm_dir.mkdir()
    policy = vm_dir / "vm.toml"
    policy.write_text(VM_POLICY)
    kernel = find_kernel()
    initrd = vm_dir / "initrd.img"
    vmv.build_initrd(kernel, initrd, disk=True)     # the verifier's reference (`cwlite vm initrd --disk`)
    up = vm_up(host.layout.host_dir, "--kernel", str(kernel), "--policy", str(policy), "--db", str(image.db),
               "--disk", str(image.path), name=VM2)
    try:
        assert up.returncode == 0, f"vm up --disk failed: {up.stderr[-3000:]}"
        yield Site(host.layout, host.demo, kernel, initrd, policy, image.db, up, name=VM2, disk=image.path)
    finally:
        cwlite("vm", "down", VM2, "--data-dir", str(host.layout.host_dir), timeout=120)


def test_a_vm_booted_from_a_disk_image_is_trusted_through_the_host_chain(disk_site: Site, image: Image) -> None:
    lines = disk_site.up.stderr.splitlines()
    logged = [line.split(": ", 1)[1].split(":")[1:4] for line in lines if line.startswith("host log entry")]
    assert logged == [["vm-part", "-", p] for p in ("kernel", "initrd", "cmdline", "policy", "disk")] + [
        ["vm-vtpm", "-", "create"]]
    att = disk_site.attest()
    assert att.verdict == "trusted", att.reasons
    via = json.loads(att.proof)["via"]
    assert via["parts"]["disk"]["digest"] == sha256_file(image.path).hex()
    assert via["parts"]["initrd"]["digest"] == sha256_file(disk_site.initrd).hex()
    # the measured cmdline is the guest's, and boots the image as its root
    guest = disk_site.guest_cmdline()
    assert guest == disk_site.facts()["cmdline"] and disk_site.host_entry("cmdline") == cmdline_digest(guest)
    assert "root=/dev/vda" in guest.split()
    # qemu has the measured copy read-only as the root, and a separate writable scratch disk
    vm = vmv.VmDir(disk_site.data.resolve(), VM2)
    drives = [a for a in disk_site.qemu() if a.startswith("if=none,")]
    root = [d for d in drives if f"file={vm.disk}," in d]
    scratch = [d for d in drives if f"file={vm.scratch}," in d]
    assert len(root) == 1 and "readonly=on" in root[0].split(","), drives
    assert len(scratch) == 1 and "readonly=on" not in scratch[0], drives
    assert sha256_file(vm.disk) == sha256_file(image.path)       # the guest never wrote it
    text = disk_site.console()
    assert "[cwlite-vm] the root disk read-only" in text and "on /tmp" in text
    assert text.index(vmv.BOOTED_MARK) < text.index(vmv.ENFORCING_MARK) < text.index(vmv.READY_MARK)
    # the image's cwlite enforced before the workload, and the image's distccd entered its label
    kinds = [v.kind for v in att.entries]
    start = kinds.index(EventKind.DAEMON_START.value)
    assert not set(kinds[:start]) & chain.WORKLOAD_KINDS
    enter = [(v.label, v.subject) for v in att.entries if v.kind == EventKind.LABEL_TRANSITION.value]
    assert enter == [("tp_distcc", "/usr/bin/distccd")], enter
    loads = {v.subject for v in att.entries if v.kind == EventKind.TRUSTED_LOAD.value and v.label == "tp_distcc"}
    assert "/usr/bin/distccd" in loads and any("libc.so" in s for s in loads), loads


def test_a_disk_image_changed_by_one_byte_fails_naming_the_disk_entry(disk_site: Site, tmp_path: Path) -> None:
    """The verifier's image differs from the booted one in one byte (the host log's disk entry disagrees)."""
    other = tmp_path / "vm-other.img"
    subprocess.run(["cp", "--sparse=always", str(disk_site.disk), str(other)], check=True, timeout=600)
    with open(other, "r+b") as f:
        f.seek(1024 + 0x78)                          # the superblock's volume name: the label's first byte
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    att = disk_site.attest(disk=other)
    assert att.verdict == "untrusted"
    entry = json.loads(att.proof)["via"]["parts"]["disk"]["index"]
    assert att.reasons == (f"host log entry {entry} (disk of VM {VM2}): "
                           f"{sha256_file(disk_site.disk).hex()[:16]} is not the verifier's disk "
                           f"{sha256_file(other).hex()[:16]}",)


def test_a_disk_vm_checked_as_a_host_root_vm_fails_naming_the_disk_entry(disk_site: Site) -> None:
    """A verifier with no disk reference (it expects a VM over its host's root) is told the host booted one."""
    boot = disk_site.boot_reference()
    boot.pop("disk")
    att = disk_site.attest(boot=boot)
    assert att.verdict == "untrusted"
    entry = json.loads(att.proof)["via"]["parts"]["disk"]["index"]
    assert len(att.reasons) == 1 and att.reasons[0].startswith(f"host log entry {entry} (disk of VM {VM2}):")
