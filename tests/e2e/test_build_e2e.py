"""`cwlite build` end to end: a real C project compiled by distcc on two verified build hosts.

Each host is Debian's distccd under a cwlite TP label, inside a network namespace this test makes
(a veth pair: distccd listens on, and accepts from, those addresses only), with its own attestation
service, swtpm and measurement log. The two hosts share this machine's kernel and ONE PRIMA engine
(tracepoint backend, audit mode): host a's distccd enters label tp_a through /usr/bin/distccd, host
b's enters tp_b through a copy of it, and the engine's events reach each host's log by label
(tests/build_fixtures.LabelRouter). A real deployment has one engine per Build VM.

In order (the hosts' logs carry over: a host that logged a violation stays untrusted):
1. a clean build through both hosts: `cwlite build` and `cwlite provenance check` pass, in-toto's
   own tooling verifies the DSSE envelope, every object is attributed to the host that compiled it;
2. an untrusted compiler planted on host a as the build starts: its next round is UNTRUSTED, it is
   dropped, and the build is tainted naming host a, the violation entry and the objects it compiled;
3. the same on host b with --strict: the build is stopped (make killed, no link, no provenance).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from in_toto.models.metadata import Envelope
from securesystemslib.signer import SSlibKey

from controlplane.build import provenance
from controlplane.build.controller import Controller
from controlplane.core.errors import VerifyError
from controlplane.core.keys import load_signing_key
from prima.sources import build
from tests.build_fixtures import DISTCC_PORT, TOOLCHAIN, build_cluster
from tests.bypass.lab import c_project
from tests.conftest import requires

pytestmark = [requires(root=True), requires(tool="swtpm"), requires(tool="distccd"), pytest.mark.timeout(900)]

POLICY = """\
mode = "audit"
backend = "tracepoint"
pcr = 10
trust_sets = ["toolchain"]

[labels.tp_a]
entrypoints = ["/usr/bin/distccd"]
trust_set = "toolchain"

[labels.tp_b]
entrypoints = ["{entry_b}"]
trust_set = "toolchain"

[[port_authority.rules]]
port = {port}
protocol = "tcp"
labels = ["tp_a", "tp_b"]
"""


@pytest.fixture(scope="module")
def cluster():
    work = Path(tempfile.mkdtemp(prefix="cwlite-build-e2e-"))
    work.chmod(0o755)                 # distccd's jobs run as nobody
    entry_b = work / "entry-b" / "distccd"
    entry_b.parent.mkdir()
    shutil.copy2("/usr/bin/distccd", entry_b)
    db, policy = work / "measure.db", work / "policy.toml"
    build(db, from_dpkg=list(TOOLCHAIN), deps=True, from_dir=[entry_b.parent], trust_set="toolchain",
          note="build e2e: distcc, gcc-12, binutils and host b's entrypoint")
    policy.write_text(POLICY.format(entry_b=entry_b, port=DISTCC_PORT))
    try:
        with build_cluster(work, policy, db, [("build-a", "tp_a", Path("/usr/bin/distccd")),
                                              ("build-b", "tp_b", entry_b)]) as c:
            yield c
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _project(cluster, name: str, **kw) -> Path:
    """A real C project of 12 units and a main (13 objects, one link), in its own directory."""
    (cluster.work / name).mkdir()
    return c_project(cluster.work / name, 12, **kw)


def _cwlite(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_a_clean_build_through_two_verified_hosts_has_checkable_provenance(cluster):
    project = _project(cluster, "clean")
    out = cluster.work / "prov-clean"
    r = _cwlite("build", "--hosts", str(cluster.hosts_file()), "--data-dir", str(cluster.verifier_dir),
                "--policy", str(cluster.policy), "--db", str(cluster.db), "--out", str(out), "--interval", "1",
                "--json", "--", "make", "-j4", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    assert summary["tainted"] is False and summary["stopped"] is False
    jobs = {h["name"]: h["jobs"] for h in summary["hosts"]}
    assert sum(jobs.values()) == summary["jobs"]["total"] - summary["jobs"]["local"] == 13, summary
    assert all(n >= 1 for n in jobs.values()), jobs       # both hosts compiled
    assert subprocess.run([str(project / "app")], capture_output=True).returncode == 0

    # cwlite's own offline check, with the keys pinned
    r = _cwlite("provenance", "check", str(out), "--controller-key", str(cluster.verifier_dir / "controller.pub"),
                "--verifier-key", str(cluster.verifier_dir / "verifier.pub"), "--json", cwd=cluster.work)
    assert r.returncode == 0, r.stdout + r.stderr
    checked = json.loads(r.stdout)
    assert checked["subjects"] == 14 and checked["proofs"] >= 4      # 13 objects and app; proofs: >= 2 rounds x 2 hosts

    # in-toto's own tooling verifies the DSSE envelope with the controller's key
    env = Envelope.from_dict(json.loads((out / provenance.ENVELOPE).read_text()))
    key = SSlibKey.from_crypto(load_signing_key(cluster.verifier_dir / "controller.key").public_key())
    env.verify_signature(key.to_dict() | {"keyid": key.keyid})
    stmt = json.loads(env.payload)
    by_name = {s["name"]: s for s in stmt["subject"]}
    record = json.loads((out / provenance.BUILD_RECORD).read_text())
    for job in record["jobs"]:
        rel = str(Path(job["object"]).relative_to(project))
        assert by_name[rel]["annotations"]["compiledBy"] == job["host"] in jobs
    assert by_name["app"]["annotations"]["compiledBy"] == "controller"
    assert {d["name"] for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"]} == \
        {"cwlite-host:build-a", "cwlite-host:build-b"}

    # a changed output no longer matches its subject
    (project / "u0.o").write_bytes(b"not what was built")
    with pytest.raises(VerifyError) as err:
        provenance.check_dir(out)
    assert err.value.reason == "provenance-subject"


def _controller(cluster, store, ref, project, out, *, strict: bool, plant_on: str):
    planted = {}

    def report(kind: str, data: dict) -> None:
        if kind == "start":          # after every host verified, before the first job
            planted["path"] = cluster.distccd[plant_on].plant()

    ctl = Controller(cluster.build_hosts, store, ref, load_signing_key(cluster.verifier_dir / "verifier.key", create=True),
                     load_signing_key(cluster.verifier_dir / "controller.key", create=True), workdir=project, out=out,
                     strict=strict, interval=1.0, report=report)
    return ctl, planted


def test_an_untrusted_exec_on_one_host_taints_the_build_naming_host_entry_and_objects(cluster):
    project = _project(cluster, "taint")
    out = cluster.work / "prov-taint"
    with cluster.store() as store, cluster.reference() as ref:
        ctl, planted = _controller(cluster, store, ref, project, out, strict=False, plant_on="tp_a")
        result = ctl.run(["make", "-j4"])
    assert result.returncode == 0 and result.tainted and not result.stopped, result.summary()
    assert [t["host"] for t in result.taints] == ["build-a"]
    taint = result.taints[0]
    violations = [e for e in taint["entries"] if e["reason"] == "violation"]
    assert violations and violations[0]["label"] == "tp_a" and violations[0]["subject"] == str(planted["path"])
    host_a = cluster.build_hosts[0].distcc
    compiled_by_a = sorted(str(j.output.relative_to(project)) for j in result.jobs if j.host == host_a)
    assert compiled_by_a and taint["objects"] == compiled_by_a      # the objects distcc says host a compiled
    checked = provenance.check_dir(out)
    assert checked.tainted
    subjects = {s["name"]: s for s in checked.statement["subject"]}
    assert all(subjects[o]["annotations"]["tainted"] for o in compiled_by_a)


def test_with_strict_an_untrusted_exec_stops_the_build(cluster):
    project = _project(cluster, "strict", extra_recipe="sleep 60 && touch done.stamp")
    out = cluster.work / "prov-strict"
    with cluster.store() as store, cluster.reference() as ref:
        ctl, planted = _controller(cluster, store, ref, project, out, strict=True, plant_on="tp_b")
        result = ctl.run(["make", "-j4"])
    assert result.stopped and result.returncode != 0
    assert [t["host"] for t in result.taints] == ["build-b"]
    assert any(e["reason"] == "violation" and e["subject"] == str(planted["path"]) for e in result.taints[0]["entries"])
    assert not (project / "done.stamp").exists()          # make was killed during its last step
    assert result.envelope is None and not (out / provenance.ENVELOPE).exists()
    assert json.loads((out / provenance.BUILD_RECORD).read_text())["stopped"] is True
