"""The cwlite SELinux module against Debian's selinux-policy-default, and the CW-Lite check over the result.

Real tools throughout: the reference-policy devel Makefile builds the module,
`semodule -N` links it into a scratch copy of the installed store (a private
mount namespace: needs root, never touches the host's store; SELinux need not
be enabled), SETools analyses the binary policy that comes out. The graph of
the full stock policy takes minutes to build on a loaded machine, so each
linked policy is checked once per module and the tests share the result.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.core.errors import SelinuxError
from controlplane.core.policy import load_policy
from controlplane.core.selinux_render import cdi_type_of, domain_of, entry_type_of, port_type_of, render
from controlplane.host import selinux_check, selinux_module
from tests.conftest import requires

pytestmark = [requires(root=True), requires(tool="semodule"), requires(tool="checkmodule")]

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "selinux-policy" / "policy.toml"
# the attack: an untrusted login domain may write the build-output CDI
VIOLATION = f"(allow user_t {cdi_type_of(0)} (file (write)))\n"


@pytest.fixture(scope="module")
def rendered():
    return render(load_policy(REFERENCE))


@pytest.fixture(scope="module")
def module_pp(rendered, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("module")
    selinux_module.write_sources(rendered, src)
    return selinux_module.build(src)


@pytest.fixture(scope="module")
def linked(rendered, module_pp, tmp_path_factory) -> Path:
    """selinux-policy-default with the module linked in, neverallows checked."""
    root = selinux_module.scratch_store(tmp_path_factory.mktemp("store"))
    return selinux_module.link(root, module_pp, rendered)


@pytest.fixture(scope="module")
def violated(rendered, module_pp, tmp_path_factory) -> Path:
    """The same, plus VIOLATION, linked with neverallow checks off (Debian's default) so it gets in."""
    root = selinux_module.scratch_store(tmp_path_factory.mktemp("store_bad"), expand_check=False)
    extra = root / "cwlite_violation.cil"
    extra.write_text(VIOLATION)
    return selinux_module.link(root, module_pp, rendered, extra=[extra])


def test_module_links_into_selinux_policy_default(linked: Path) -> None:
    import setools

    pol = setools.SELinuxPolicy(str(linked))
    tp, entry = domain_of("tp_build"), entry_type_of("tp_build")
    # the TP domain is entered only through the entrypoint type
    entry_rules = list(setools.TERuleQuery(pol, ruletype=["allow"], source=tp, tclass=["file"], perms=["entrypoint"]).results())
    assert {str(t) for r in entry_rules for t in r.target.expand()} == {entry}
    # Port Authority: 3632/tcp is the TP's port type (the local label wins over distccd_port_t)
    port = [pc for pc in pol.portcons() if pc.protocol.name == "tcp" and pc.ports.low <= 3632 <= pc.ports.high]
    assert str(port[0].context.type_) == port_type_of(3632, "tcp")
    service = [pc for pc in pol.portcons() if pc.protocol.name == "tcp" and pc.ports.low <= 8443 <= pc.ports.high]
    assert str(service[0].context.type_) == "cwlite_service_port_t"
    binds = setools.TERuleQuery(pol, ruletype=["allow"], source=tp, source_indirect=False, perms=["name_bind"]).results()
    assert {str(t) for r in binds for t in r.target.expand()} == {port_type_of(3632, "tcp")}
    # the file contexts put the measured entrypoint and the CDI under the module's types
    fc = (linked.parents[1] / "contexts/files/file_contexts").read_text()
    assert f"/usr/bin/distccd\t--\tsystem_u:object_r:{entry}:s0" in fc
    assert f"/srv/build/out(/.*)?\tsystem_u:object_r:{cdi_type_of(0)}:s0" in fc


def test_module_neverallow_refuses_an_untrusted_writer_of_a_cdi(rendered, module_pp, tmp_path: Path) -> None:
    root = selinux_module.scratch_store(tmp_path / "store")
    extra = tmp_path / "cwlite_violation.cil"
    extra.write_text(VIOLATION)
    with pytest.raises(SelinuxError) as info:
        selinux_module.link(root, module_pp, rendered, extra=[extra])
    assert "neverallow" in str(info.value) and cdi_type_of(0) in str(info.value)
    assert "\n" not in str(info.value)


CDIS = {"cwlite_policy_t", "cwlite_db_t", cdi_type_of(0)}
TP = domain_of("tp_build")


@pytest.fixture(scope="module")
def clean_check(linked: Path) -> selinux_check.CheckResult:
    return selinux_check.check_policy(linked)


@pytest.fixture(scope="module")
def bad_cli(violated: Path, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """`cwlite selinux check` on the policy with the added rule: JSON out, a PNG of the flows."""
    png = tmp_path_factory.mktemp("graph") / "flows.png"
    proc = subprocess.run([sys.executable, "-m", "controlplane.cli", "selinux", "check", str(violated),
                           "--json", "--graph", str(png)], capture_output=True, text=True, cwd=REPO)
    return proc, (json.loads(proc.stdout) if proc.stdout else {}), png


def test_check_passes_on_the_modules_cdi_types(clean_check) -> None:
    r = clean_check
    assert CDIS | {TP, entry_type_of("tp_build")} == set(r.high)
    assert {"user_t", "tmp_t", "node_t"} <= set(r.low)
    # no low type reaches a CDI: only the TP domain and cwlite_t write them
    assert not [f.types() for f in r.flows if f.high in CDIS]
    # the TP's network input is its filtering interface (it holds the Port Authority port)
    assert {"node_t", "netif_t"} <= set(r.filters[TP])
    assert not [f for f in r.flows if f.types() in (["node_t", TP], ["netif_t", TP])]
    # what the stock policy lets into the TP domain and its entrypoint is reported, each with its rules
    assert r.flows and {f.high for f in r.flows} <= {TP, entry_type_of("tp_build")}
    assert all(s.rules for f in r.flows for s in f.steps)


def test_check_names_the_exact_flow_of_the_added_rule(bad_cli, clean_check) -> None:
    proc, data, png = bad_cli
    assert proc.returncode == 1, proc.stderr
    assert data["ok"] is False
    into_cdis = [f for f in data["flows"] if f["high"] in CDIS]
    assert [f["path"] for f in into_cdis] == [["user_t", cdi_type_of(0)]]
    (step,) = into_cdis[0]["steps"]
    assert step["weight"] == 10
    assert step["rules"] == [f"allow user_t {cdi_type_of(0)}:file write;"]
    # nothing else changed
    assert len(data["flows"]) == len(clean_check.flows) + 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_errors_name_the_field(linked: Path, tmp_path: Path) -> None:
    with pytest.raises(SelinuxError) as info:
        selinux_check.check_policy(linked, high=["no_such_type_t"])
    assert info.value.field == "high" and "no_such_type_t" in str(info.value)
    junk = tmp_path / "policy.33"
    junk.write_bytes(b"not a policy")
    with pytest.raises(SelinuxError) as info:
        selinux_check.check_policy(junk)
    assert str(junk) in str(info.value) and "\n" not in str(info.value)
