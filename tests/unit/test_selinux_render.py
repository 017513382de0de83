"""The SELinux module rendered from a cwlite policy: deterministic, complete, and what selinux-policy/ holds."""
from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.cli.main import main
from controlplane.core.errors import SelinuxError
from controlplane.core.policy import load_policy, parse_policy
from controlplane.core.selinux_render import FILES, cdi_type_of, domain_of, entry_type_of, port_type_of, render

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "selinux-policy" / "policy.toml"

POLICY = """\
mode = "enforce"
trust_sets = ["core", "toolchain"]

[labels.tp_build]
entrypoints = ["/usr/bin/distccd", "/usr/lib/distcc/distccd+wrapper"]
trust_set = "toolchain"

[labels.tp_sign]
entrypoints = ["/usr/local/bin/signer"]
trust_set = "core"

[[cdis]]
path = "/srv/build/out"
writers = ["tp_build"]

[[cdis]]
path = "/srv/release/"
writers = ["tp_build", "tp_sign"]

[[port_authority.rules]]
port = 3632
labels = ["tp_build"]

[[port_authority.rules]]
port = 5353
protocol = "udp"
labels = ["tp_build", "tp_sign"]
"""

# the same policy with keys, tables and whitespace reordered: the same canonical policy
REORDERED = """\
trust_sets = [ "core", "toolchain" ]
mode = "enforce"
[[port_authority.rules]]
labels = ["tp_build"]
port = 3632
[[port_authority.rules]]
protocol = "udp"
port = 5353
labels = ["tp_build", "tp_sign"]
[labels.tp_sign]
trust_set = "core"
entrypoints = ["/usr/local/bin/signer"]
[labels.tp_build]
trust_set = "toolchain"
entrypoints = ["/usr/bin/distccd", "/usr/lib/distcc/distccd+wrapper"]
[[cdis]]
writers = ["tp_build"]
path = "/srv/build/out"
[[cdis]]
path = "/srv/release/"
writers = ["tp_build", "tp_sign"]
"""


def test_render_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    a = render(parse_policy(POLICY, source="a.toml"))
    b = render(parse_policy(REORDERED, source="elsewhere/b.toml"))
    assert a.files == b.files
    assert a.digest() == b.digest()
    out1, out2 = tmp_path / "1", tmp_path / "2"
    for out in (out1, out2):
        (tmp_path / "p.toml").write_text(POLICY)
        assert main(["selinux", "render", str(tmp_path / "p.toml"), "--out", str(out)]) == 0
    for name in FILES:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes() == a.files[name].encode()


def test_render_changes_with_the_policy() -> None:
    a = render(parse_policy(POLICY, source="a.toml"))
    b = render(parse_policy(POLICY.replace("port = 3632", "port = 3633"), source="a.toml"))
    assert a.digest() != b.digest()
    assert "3633" in b.files["cwlite.ports"] and "3632" not in b.files["cwlite.ports"]


def test_render_names_every_label_entrypoint_cdi_and_port() -> None:
    r = render(parse_policy(POLICY, source="a.toml"))
    te, fc = r.files["cwlite.te"], r.files["cwlite.fc"]
    for label in ("tp_build", "tp_sign"):
        assert f"type {domain_of(label)}, cwlite_tp_domain;" in te
        assert f"init_daemon_domain({domain_of(label)}, {entry_type_of(label)})" in te
    # entrypoint paths are file_contexts regexes: metacharacters escaped
    assert f"/usr/lib/distcc/distccd\\+wrapper\t--\tgen_context(system_u:object_r:{entry_type_of('tp_build')},s0)" in fc
    assert f"/srv/release(/.*)?\tgen_context(system_u:object_r:{cdi_type_of(1)},s0)" in fc
    # CDI writers: only the labels named, and cwlite_t
    assert f"neverallow {{ domain -cwlite_t -cwlite_tp_build_t }} {cdi_type_of(0)}:file" in te
    assert f"neverallow {{ domain -cwlite_t -cwlite_tp_build_t -cwlite_tp_sign_t }} {cdi_type_of(1)}:file" in te
    # Port Authority: each label binds only its rules' ports
    assert f"neverallow cwlite_tp_sign_t {{ port_type -{port_type_of(5353, 'udp')} }}:udp_socket name_bind;" in te
    assert "neverallow cwlite_tp_sign_t { port_type }:tcp_socket name_bind;" in te
    assert r.ports == (("tcp", 8443, "cwlite_service_port_t"),
                       ("tcp", 3632, port_type_of(3632, "tcp")), ("udp", 5353, port_type_of(5353, "udp")))


def test_selinux_policy_folder_is_the_render_of_its_policy() -> None:
    """selinux-policy/ holds the reference policy's render: they never disagree."""
    r = render(load_policy(REFERENCE))
    for name in FILES:
        assert (REPO / "selinux-policy" / name).read_text() == r.files[name], f"re-run: cwlite selinux render {REFERENCE} --out selinux-policy"


@pytest.mark.parametrize("path", ["/srv/build out", "/srv/\u00e9", "/srv//x"])
def test_unrenderable_path_is_one_line_naming_the_field(path: str) -> None:
    pol = parse_policy(POLICY.replace('"/srv/build/out"', f'"{path}"'), source="bad.toml")
    with pytest.raises(SelinuxError) as info:
        render(pol)
    assert info.value.field == "cdis[0].path" and info.value.source == "bad.toml"
    assert "\n" not in str(info.value) and str(info.value).startswith("bad.toml: cdis[0].path:")


def test_a_port_rule_on_the_service_port_is_refused() -> None:
    pol = parse_policy(POLICY.replace("port = 5353", "port = 8443").replace('protocol = "udp"\n', ""), source="bad.toml")
    with pytest.raises(SelinuxError) as info:
        render(pol)
    assert info.value.field == "port_authority.rules[1].port" and str(info.value).startswith("bad.toml: port_authority.rules[1].port: 8443/tcp")
