"""`cwlite build` through a real Build VM: booted by `cwlite vm up`, verified through the host chain.

The host is the demo slice (tracepoint enforcement + swtpm + HTTPS service, enrolled as HOST); the
Build VM is Debian's kernel under qemu with its own vTPM, running `cwlite serve --enforce --backend lsm`
before its distccd (label tp_distcc; the policy's Port Authority rule names only tp_distcc on 3632, which is
what the controller checks, and what the guest's lsm Port Authority enforces). The host forwards
the VM's attestation and distccd ports to loopback. The hosts file says "this host is VM vm-build,
verify it via HOST" (`[hosts.vm]`), so every round is `verify vm-build --via HOST`: the host's quote and
log, its record of the VM's boot parts and vTPM, then the VM's quote by that vTPM's AK and its log.

One VM, booted once for the module (software emulation on 2 shared cores: the fixture took 722 s at a load
of ~11, most of it the guest's bcc compile before `enforcing`; a second concurrent VM would need its own
compile on the same two cores, for no new fact: the netns cluster of tests/e2e/test_build_e2e.py covers
two hosts and --strict). In order:
1. a clean build of a small C project (4 objects) entirely on the VM: provenance check and in-toto's
   own verifier pass, each object is attributed to the VM, and the proofs carry the host chain;
2. the VM's log, judged through the chain, shows distccd entering tp_distcc and cc1/as loaded under it;
3. a compiler no trusted source measured is planted on the VM's distccd PATH (a directory of the host
   the guest sees over 9p), and the next build (audit mode) is tainted naming the VM, the violation
   entry of its log, and exactly the objects the VM compiled.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from in_toto.models.metadata import Envelope
from securesystemslib.signer import SSlibKey

from controlplane.build import provenance
from controlplane.build.hosts import load_hosts
from controlplane.cli.demo import Demo, Layout, prepare
from controlplane.core import proof as proof_mod
from controlplane.core.events import EventKind
from controlplane.core.keys import load_signing_key
from controlplane.core.policy import load_policy
from controlplane.host import vmv
from controlplane.verifier import chain
from controlplane.verifier.judge import Reference
from prima.measuredb import MeasureDB
from prima.sources import build
from tests.build_fixtures import COMPILER, TOOLCHAIN, TROJAN_C
from tests.bypass.lab import c_project
from tests.conftest import requires
from tests.vm.harness import find_kernel
from tests.vm.test_vmv import HOST, VM_POLICY as CHAIN_POLICY, cwlite

pytestmark = [requires(root=True, tool="qemu-system-x86_64"), requires(tool="swtpm"), requires(tool="distccd"),
              pytest.mark.timeout(3000)]

VM = "vm-build"
PLANT_ROOT = Path("/mnt")
VM_POLICY = CHAIN_POLICY   # its Port Authority rule lets only tp_distcc listen on 3632
HOSTS = """\
[[hosts]]
name = "{vm}"
distcc = "127.0.0.1:{port}"
jobs = 2
label = "tp_distcc"

[hosts.vm]
via = "{host}"
kernel = "{kernel}"
cmdline = {cmdline}
host_policy = "{host_policy}"
host_db = "{host_db}"
initrd = "{initrd}"
"""


@dataclass
class Site:
    """The host (demo slice), the VM's policy and DB (the verifier's copies), the hosts file, the plant dir."""

    layout: Layout
    demo: Demo
    work: Path
    vm_policy: Path
    vm_db: Path
    hosts: Path
    plant: Path

    def build(self, name: str, *make: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
        """`cwlite build` of a fresh 3-unit project (4 objects, one link) through the hosts file."""
        (self.work / name).mkdir()
        project = c_project(self.work / name, 3)
        out = self.work / f"prov-{name}"
        r = subprocess.run([sys.executable, "-m", "controlplane.cli", "build", "--hosts", str(self.hosts), "--data-dir", str(self.layout.verifier_dir),
                   "--policy", str(self.vm_policy), "--db", str(self.vm_db), "--out", str(out), "--interval", "5",
                   "--json", "--", "make", *make], cwd=project, capture_output=True, text=True, timeout=2500)
        return project, out, r


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("vmbuild")
    work.chmod(0o755)                          # the guest's distccd jobs run as nobody
    layout = prepare(work / "site")
    vm_dir = work / "vm-files"
    vm_dir.mkdir()
    policy, db = vm_dir / "vm.toml", vm_dir / "vm.db"
    policy.write_text(VM_POLICY)
    build(db, from_dpkg=list(TOOLCHAIN), deps=True, trust_set="build",
          note="the Build VM's distccd, gcc-12, binutils and their libraries")
    kernel = find_kernel()
    initrd = vm_dir / "initrd.img"
    vmv.build_initrd(kernel, initrd)           # the verifier's reference, built apart from the VM's copy
    # First on the VM's distccd PATH; empty until test 2. Not under /tmp: virtme-ng overlays /tmp, /usr, /var, ...
    # in the guest, and a file added to an overlay's lower layer after the guest looked the name up may stay
    # unseen (overlayfs: lower layers changed while mounted are undefined); /mnt is the host's root over 9p.
    plant = Path(tempfile.mkdtemp(prefix="cwlite-vmbuild-plant-", dir=PLANT_ROOT))
    plant.chmod(0o755)                         # distccd's jobs run as nobody
    workload = (f"/usr/bin/env PATH={plant}:/usr/bin:/bin TMPDIR=/var/tmp HOME=/var/tmp /usr/bin/distccd "
                "--no-detach --daemon --allow 10.0.2.0/24 --listen 0.0.0.0 --port 3632 --jobs 2 --log-stderr "
                "--log-level warning")
    try:
        with Demo.start(layout) as demo:
            demo.enrol(HOST)
            up = cwlite("vm", "up", VM, "--data-dir", str(layout.host_dir), "--timeout", "2400", "--kernel",
                        str(kernel), "--policy", str(policy), "--db", str(db), "--workload", workload, "--json")
            try:
                assert up.returncode == 0, f"vm up failed: {up.stderr[-3000:]}"
                facts = json.loads(up.stdout)
                hosts = work / "hosts.toml"
                hosts.write_text(HOSTS.format(vm=VM, port=facts["distcc_port"], host=HOST, kernel=kernel,
                                              cmdline=json.dumps(facts["cmdline"]), host_policy=layout.verifier_policy,
                                              host_db=layout.verifier_db, initrd=initrd))
                yield Site(layout, demo, work, policy, db, hosts, plant)
            finally:
                cwlite("vm", "down", VM, "--data-dir", str(layout.host_dir), timeout=120)
    finally:
        shutil.rmtree(plant, ignore_errors=True)


def test_a_clean_build_on_the_vm_verified_through_its_host_has_checkable_provenance(site: Site) -> None:
    assert load_hosts(site.hosts)[0].vm.via == HOST
    project, out, r = site.build("clean", "-j2")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["tainted"] is False and summary["stopped"] is False
    assert summary["hosts"][0]["name"] == VM and summary["hosts"][0]["active"]
    assert summary["hosts"][0]["jobs"] == summary["jobs"]["total"] == 4 and summary["jobs"]["local"] == 0, summary
    assert subprocess.run([str(project / "app")], capture_output=True).returncode == 0

    r = cwlite("provenance", "check", str(out), "--controller-key", str(site.layout.verifier_dir / "controller.pub"),
               "--verifier-key", str(site.layout.verifier_dir / "verifier.pub"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["subjects"] == 5          # 4 objects and app

    env = Envelope.from_dict(json.loads((out / provenance.ENVELOPE).read_text()))
    key = SSlibKey.from_crypto(load_signing_key(site.layout.verifier_dir / "controller.key").public_key())
    env.verify_signature(key.to_dict() | {"keyid": key.keyid})
    stmt = json.loads(env.payload)
    subjects = {s["name"]: s["annotations"]["compiledBy"] for s in stmt["subject"]}
    assert subjects == {"main.o": VM, "u0.o": VM, "u1.o": VM, "u2.o": VM, "app": "controller"}
    (dep,) = stmt["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert dep["name"] == f"cwlite-host:{VM}" and dep["annotations"]["verifiedVia"] == HOST

    # every proof is the VM's, through the host: the host's own signed proof inside, both quotes valid
    pub = load_signing_key(site.layout.verifier_dir / "verifier.key").public_key()
    proofs = [b for b in stmt["predicate"]["runDetails"]["byproducts"] if b["name"].startswith(provenance.PROOFS)]
    assert len(proofs) >= 2 and all(b["annotations"]["via"] == HOST for b in proofs)
    doc = proof_mod.check((out / proofs[0]["name"]).read_bytes(), pub)
    host_doc = proof_mod.check(doc["via"]["host_proof"].encode(), pub)
    assert doc["host"]["name"] == VM and host_doc["host"]["name"] == HOST and host_doc["verdict"] == "trusted"
    assert doc["via"]["vtpm_entry"]["op"] == "create"


def test_the_vms_jobs_ran_under_distccds_tp_label(site: Site) -> None:
    """After the clean build: the VM's log (judged through the chain) shows distccd entering tp_distcc and the
    compiler's parts loaded trusted under it, so the clean proofs vouch for the jobs, not an idle VM."""
    link = load_hosts(site.hosts)[0].vm
    host_ref = Reference(load_policy(site.layout.verifier_policy), MeasureDB.open(site.layout.verifier_db))
    vm_ref = Reference(load_policy(site.vm_policy), MeasureDB.open(site.vm_db))
    try:
        att = chain.attest_via(VM, site.demo.store.host(HOST), host_ref, vm_ref, link.boot(), site.demo.key,
                               store=site.demo.store)
    finally:
        host_ref.db.close()
        vm_ref.db.close()
    assert att.verdict == "trusted", att.reasons
    entered = [e.subject for e in att.entries if e.kind == EventKind.LABEL_TRANSITION.value and e.label == "tp_distcc"]
    assert entered and entered[0] == "/usr/bin/distccd", entered
    loaded = {Path(e.subject).name for e in att.entries
              if e.kind == EventKind.TRUSTED_LOAD.value and e.label == "tp_distcc"}
    assert "cc1" in loaded and any(n == "as" or n.endswith("-linux-gnu-as") for n in loaded), sorted(loaded)


def test_an_untrusted_exec_on_the_vm_taints_the_build_naming_vm_entry_and_objects(site: Site) -> None:
    """Audit mode: the VM's distccd runs the planted compiler for its jobs; the round after them is UNTRUSTED,
    the VM is dropped (later jobs run locally), and the build is tainted with the VM's violation entry."""
    trojan, src = site.plant / COMPILER, site.work / "trojan.c"
    src.write_text(TROJAN_C)
    subprocess.run(["/usr/bin/gcc", "-O2", "-o", str(trojan), str(src)], check=True, capture_output=True, timeout=300)
    trojan.chmod(0o755)
    project, out, r = site.build("taint", "-j2")
    assert r.returncode == 2, r.stdout + r.stderr[-3000:]         # EXIT_TAINTED: the build itself succeeded
    summary = json.loads(r.stdout)
    assert summary["tainted"] and not summary["stopped"]
    (taint,) = summary["taints"]
    assert taint["host"] == VM
    violations = [e for e in taint["entries"] if e["reason"] == "violation"]
    assert violations and violations[0]["label"] == "tp_distcc" and violations[0]["subject"] == str(trojan), taint
    record = json.loads((out / provenance.BUILD_RECORD).read_text())
    by_vm = sorted(str(Path(j["object"]).relative_to(project)) for j in record["jobs"] if j["host"] == VM)
    assert by_vm and taint["objects"] == by_vm
    checked = provenance.check_dir(out)
    assert checked.tainted
    subjects = {s["name"]: s for s in checked.statement["subject"]}
    assert all(subjects[o]["annotations"]["tainted"] for o in by_vm)
    # the violation is in the VM's own log, judged through the chain: the dropping proof names it
    last = json.loads((out / taint["proof"]).read_text())
    assert last["verdict"] == "untrusted" and last["via"]["host"] == HOST
    assert any(e["subject"] == str(trojan) and e["reason"] == "violation" for e in last["entries"])
