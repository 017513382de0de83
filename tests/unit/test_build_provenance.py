"""The build controller's parts that need no kernel or TPM: DSSE/in-toto provenance, distcc's log,
the hosts file and the Port Authority condition.

The distcc log is made by real distcc 3.4 here: a distccd on loopback (unprivileged) compiles one
file, and the client log it writes is what `parse_log` reads.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from in_toto.models.metadata import Envelope, Metadata
from securesystemslib.signer import SSlibKey

from controlplane.build import provenance
from controlplane.build.distcc import LOCAL, DistccRun, parse_log
from controlplane.build.hosts import BuildHost, VmLink, load_hosts, port_authority_refusal
from controlplane.cli.main import main
from controlplane.core.errors import FileError, VerifyError
from controlplane.core.policy import parse_policy
from controlplane.core.vmrecord import NO_PART, cmdline_digest
from tests.build_fixtures import wait_listening
from tests.conftest import requires

STATEMENT = {"_type": provenance.STATEMENT_TYPE, "subject": [{"name": "a.o", "digest": {"sha256": "00" * 32}}],
             "predicateType": provenance.SLSA_PROVENANCE, "predicate": {"buildDefinition": {}, "runDetails": {}}}


def _sslib(key: Ed25519PrivateKey) -> dict:
    k = SSlibKey.from_crypto(key.public_key())
    return k.to_dict() | {"keyid": k.keyid}


def test_the_envelope_verifies_with_in_totos_own_tooling():
    key = Ed25519PrivateKey.generate()
    envelope = provenance.sign_envelope(STATEMENT, key)
    env = Metadata.from_dict(json.loads(json.dumps(envelope)))
    assert isinstance(env, Envelope)
    env.verify_signature(_sslib(key))                       # raises on a bad signature
    assert json.loads(env.payload) == STATEMENT
    assert envelope["signatures"][0]["keyid"] == SSlibKey.from_crypto(key.public_key()).keyid


def test_pae_is_the_dsse_v1_encoding():
    # the DSSE spec's own example (protocol.md): "DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert provenance.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


@pytest.mark.parametrize("tamper", ["payload", "type", "key"])
def test_a_changed_envelope_is_refused_by_both_checkers(tamper):
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    envelope = provenance.sign_envelope(STATEMENT, key)
    check_key = key
    if tamper == "payload":
        envelope["payload"] = base64.b64encode(json.dumps({**STATEMENT, "subject": []}).encode()).decode()
    elif tamper == "type":
        envelope["payloadType"] = "application/json"
    else:
        check_key = other
    with pytest.raises(VerifyError) as err:
        provenance.open_envelope(envelope, check_key.public_key())
    assert err.value.reason in ("provenance-signature", "provenance-format")
    if tamper != "type":      # in-toto does not read an envelope of another payload type at all
        with pytest.raises(Exception):
            Envelope.from_dict(envelope).verify_signature(_sslib(check_key))


def test_distcc_log_lines_are_attributed_to_hosts():
    text = """\
distcc[21019] compile from a.c to sub/a.o
distcc[21037] compile from b.c to b.o
distcc[21019] exec on 10.0.0.2:3632/2: x86_64-linux-gnu-gcc -O2 -c a.c -o sub/a.o
distcc[21019] cpp a.c on localhost completed ok
distcc[21037] ERROR: nonblocking connect to 10.0.0.3:3632 failed: Connection refused
distcc[21037] Warning: failed to distribute b.c to 10.0.0.3:3632/2, running locally instead
distcc[21019] compile a.c on 10.0.0.2:3632/2 completed ok
distcc[21037] compile b.c on localhost completed ok
distcc[21050] compile from c.c to c.o
"""
    pending: dict = {}
    jobs = parse_log(text, {21019: "/src/x", 21037: "/src/y"}, pending)
    assert [(j.pid, j.source, str(j.output), j.host) for j in jobs] == [
        (21019, "a.c", "/src/x/sub/a.o", "10.0.0.2:3632"), (21037, "b.c", "/src/y/b.o", LOCAL)]
    assert pending == {21050: ("c.c", "c.o")}          # not completed yet: kept for the next read


@requires(tool="distccd")
def test_real_distcc_client_log_names_the_host(tmp_path):
    """A real distccd on loopback compiles through the controller's masquerade; the log says where."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = tmp_path / "distccd.err"
    with open(err, "wb") as f:
        proc = subprocess.Popen(["distccd", "--daemon", "--no-detach", "--listen", "127.0.0.1", "--port", str(port),
                                 "--allow", "127.0.0.1", "--jobs", "1", "--log-stderr", "--user", "nobody"],
                                stdout=f, stderr=f)
    try:
        wait_listening("127.0.0.1", port, proc, err)
        src = tmp_path / "src" / "sub"
        src.mkdir(parents=True)
        (src / "m.c").write_text("int m(void) { return 7; }\n")
        run = DistccRun(tmp_path / "run")
        run.prepare(os.environ["PATH"])
        run.write_hosts([BuildHost("h", "127.0.0.1", port, 1).spec])
        r = subprocess.run(["gcc", "-O2", "-c", "m.c", "-o", "m.o"], cwd=src, env=run.env(dict(os.environ)),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr + run.log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    (job,) = run.collect()
    assert (job.host, job.source, job.output) == (f"127.0.0.1:{port}", "m.c", src / "m.o")
    assert (src / "m.o").read_bytes()[:4] == b"\x7fELF"


def test_hosts_file_errors_name_the_file_line_and_key(tmp_path):
    good = tmp_path / "hosts.toml"
    good.write_text('[[hosts]]\nname = "b1"\ndistcc = "10.0.0.2:3632"\njobs = 4\n')
    assert load_hosts(good) == (BuildHost("b1", "10.0.0.2", 3632, 4, ""),)
    for text, where in (('[[hosts]]\nname = "b1"\ndistcc = "host:x"\n', ":3: hosts[0].distcc: "),
                        ('[[hosts]]\nname = "b1"\ndistcc = "10.0.0.2:3632"\njobs = 0\n', ":4: hosts[0].jobs: "),
                        ('[[hosts]]\nname = "b1"\ndistcc = "10.0.0.2:3632"\ncolour = 1\n', ":4: hosts[0].colour: unknown key"),
                        ('[[hosts]]\nname = "b1"\n', ":1: hosts[0].distcc: required key missing"),
                        ('[[hosts]]\nname = "b1"\ndistcc = "10.0.0.2:1"\n[[hosts]]\nname = "b1"\ndistcc = "10.0.0.3:1"\n',
                         ":5: hosts[1].name: host 'b1' listed twice")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(FileError) as err:
            load_hosts(bad)
        assert f"{bad}{where}" in str(err.value)


VM_HOST = """\
[[hosts]]
name = "b1"
distcc = "10.0.0.2:3632"

[[hosts]]
name = "vm1"
distcc = "127.0.0.1:40123"
[hosts.vm]
via = "host1"
kernel = "vmlinuz"
cmdline = "lsm=bpf -- init"
host_policy = "host.toml"
host_db = "/abs/host.db"
"""


def test_a_build_vm_is_verified_through_the_host_that_booted_it(tmp_path):
    """`[hosts.vm]`: the VM's chain (host, boot parts, the host's references); paths relative to the file."""
    (tmp_path / "vmlinuz").write_bytes(b"kernel bytes")
    (tmp_path / "host.toml").write_text("")
    db = tmp_path / "abs-host.db"
    db.write_bytes(b"")
    path = tmp_path / "hosts.toml"
    path.write_text(VM_HOST.replace("/abs/host.db", str(db)))
    plain, vm = load_hosts(path)
    assert plain.vm is None and plain.distccd_port == 3632
    assert (vm.name, vm.distcc, vm.distccd_port) == ("vm1", "127.0.0.1:40123", 3632)
    assert vm.vm.via == "host1" and vm.vm.kernel == tmp_path / "vmlinuz" and vm.vm.host_db == db
    boot = vm.vm.boot()
    assert boot["kernel"] == hashlib.sha256(b"kernel bytes").digest() and boot["initrd"] == NO_PART
    assert boot["cmdline"] == cmdline_digest("lsm=bpf -- init")
    for old, new, where in (
            ('kernel = "vmlinuz"', 'kernel = "nokernel"', f":10: hosts[1].vm.kernel: {tmp_path / 'nokernel'}: no such file"),
            ('via = "host1"', 'via = "vm1"', ":9: hosts[1].vm.via: a VM is verified through another host"),
            ('via = "host1"', 'via = ""', ":9: hosts[1].vm.via: expected a non-empty string"),
            ('cmdline = "lsm=bpf -- init"\n', "", ":8: hosts[1].vm.cmdline: required key missing"),
            ('[hosts.vm]\n', '[hosts.vm]\nmemory = "1G"\n', ":9: hosts[1].vm.memory: unknown key"),
            ('host_db', 'distccd_port = 0\nhost_db', ":13: hosts[1].vm.distccd_port: 0 is not a port"),
            ('name = "vm1"', 'name = "VM_1"', ":6: hosts[1].name: not a VM name"),
            ('[hosts.vm]\nvia', 'vm = 3\n[x]\nvia', "expected one or more [[hosts]]")):
        path.write_text(VM_HOST.replace("/abs/host.db", str(db)).replace(old, new))
        with pytest.raises(FileError) as err:
            load_hosts(path)
        assert where in str(err.value), (new, str(err.value))
    path.write_text(VM_HOST.replace("/abs/host.db", str(db)).replace("[hosts.vm]\n", "[hosts.vm]\ndistccd_port = 7\n"))
    assert load_hosts(path)[1].distccd_port == 7
    # a VM booted from a disk image: the image is a boot part the chain compares too
    (tmp_path / "vm.img").write_bytes(b"image bytes")
    path.write_text(VM_HOST.replace("/abs/host.db", str(db)).replace("[hosts.vm]\n", '[hosts.vm]\ndisk = "vm.img"\n'))
    assert load_hosts(path)[1].vm.boot()["disk"] == hashlib.sha256(b"image bytes").digest()
    assert "disk" not in vm.vm.boot()
    path.write_text(VM_HOST.replace("/abs/host.db", str(db)).replace("[hosts.vm]\n", '[hosts.vm]\ndisk = "no.img"\n'))
    with pytest.raises(FileError, match=r":9: hosts\[1\]\.vm\.disk: .*no\.img: no such file"):
        load_hosts(path)
    second = VM_HOST.split("\n\n")[1].replace("vm1", "vm2").replace("40123", "40124")
    path.write_text(VM_HOST.replace("/abs/host.db", str(db)) + "\n" + second.replace("/abs/host.db", "vmlinuz"))
    with pytest.raises(FileError, match=r":18: hosts\[2\].vm: host host1's host_policy/host_db differ from those vm1"):
        load_hosts(path)


POLICY = """\
mode = "enforce"
trust_sets = ["t"]
[labels.tp_build]
entrypoints = ["/usr/bin/distccd"]
trust_set = "t"
[labels.tp_shell]
entrypoints = ["/bin/sh"]
trust_set = "t"
"""


@pytest.mark.parametrize("rules,refusal", [
    ("", "no Port Authority listen rule for 3632/tcp"),
    ('[[port_authority.rules]]\nport = 3632\nop = "connect"\nlabels = ["tp_build"]\n', "no Port Authority listen rule"),
    ('[[port_authority.rules]]\nport = 3632\nlabels = ["tp_build"]\n', ""),
    ('[[port_authority.rules]]\nport = 3632\nlabels = ["tp_shell"]\n', "no Port Authority listen rule for 3632/tcp lets tp_build"),
    ('[[port_authority.rules]]\nport = 3632\nlabels = ["tp_build"]\naddress = "10.0.0.2"\n', ""),
    ('[[port_authority.rules]]\nport = 3632\nlabels = ["tp_build", "tp_shell"]\n', "lets label tp_shell receive"),
    ('[[port_authority.rules]]\nport = 3632\nprotocol = "udp"\nlabels = ["tp_build"]\n', "no Port Authority listen rule"),
])
def test_only_distccd_may_receive_on_the_distcc_port(rules, refusal):
    policy = parse_policy(POLICY + rules, source="p.toml")
    got = port_authority_refusal(policy, BuildHost("b1", "10.0.0.2", 3632), "tp_build")
    assert (refusal in got) if refusal else got == ""


def test_a_build_vms_port_authority_rule_is_for_the_port_inside_the_vm():
    """The hosts file names the host's forwarded port; the VM's policy governs distccd's own port."""
    policy = parse_policy(POLICY + '[[port_authority.rules]]\nport = 3632\nlabels = ["tp_build"]\n', source="p.toml")
    vm = VmLink(via="h", kernel=Path("k"), cmdline="c", host_policy=Path("p"), host_db=Path("d"))
    assert port_authority_refusal(policy, BuildHost("vm1", "127.0.0.1", 40123, vm=vm), "tp_build") == ""
    assert "40123/tcp" in port_authority_refusal(policy, BuildHost("h1", "127.0.0.1", 40123), "tp_build")


def test_the_rules_and_decision_import_without_bcc_or_the_loader():
    """build -> portauthority.rules -> ebpf.abi reads the headers' numbers with no cext, loader or bcc."""
    code = ("import sys, controlplane.build.hosts, portauthority.rules; "
            "print(sorted(m for m in ('bcc', 'cext', 'ebpf.loader', 'portauthority.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_check_dir_refuses_a_proof_that_is_not_the_bound_one(tmp_path):
    """A provenance whose byproduct digest does not match the proof file is refused before any proof is read."""
    key = Ed25519PrivateKey.generate()
    (tmp_path / "proofs").mkdir()
    (tmp_path / "proofs" / "h-0.json").write_text("{}\n")
    record = provenance.record_bytes({"tainted": False})
    (tmp_path / provenance.BUILD_RECORD).write_bytes(record)
    stmt = provenance.statement(subjects=[], command=["make"], workdir=str(tmp_path), hosts=[],
                                proofs=[{"file": "proofs/h-0.json", "sha256": "11" * 32, "host": "h", "round": 0,
                                         "verdict": "trusted", "log_start": 0, "log_end": 3}],
                                record_sha256=provenance.sha256_file(tmp_path / provenance.BUILD_RECORD),
                                parameters={}, builder_id="x", started="", finished="", invocation="i")
    provenance.write_dir(tmp_path, stmt, {}, key, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(VerifyError) as err:
        provenance.check_dir(tmp_path)
    assert err.value.reason == "provenance-proof"


def test_cli_errors_are_one_line_naming_the_file(tmp_path, capsys):
    policy, db = tmp_path / "policy.toml", tmp_path / "m.db"
    policy.write_text(POLICY)
    db.write_bytes(b"")
    missing = tmp_path / "nohosts.toml"
    assert main(["build", "--hosts", str(missing), "--policy", str(policy), "--db", str(db),
                 "--data-dir", str(tmp_path / "v"), "--", "make", "-j2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err
    (tmp_path / "prov").mkdir()
    assert main(["provenance", "check", str(tmp_path / "prov"), "--controller-key", str(tmp_path / "none.pub")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.pub" in err
