"""Policy bundle: strict schema with file:line errors, canonical digest, Ed25519 signatures."""
from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core.errors import PolicyError, PolicyReason
from controlplane.core.policy import (
    AnonExec,
    Mode,
    OnExec,
    load_policy,
    parse_policy,
    sign_policy,
    signature_path,
)

GOOD = """\
# a build VM
mode = "enforce"
trust_sets = ["core", "toolchain"]

[labels.tp_build]
entrypoints = ["/usr/bin/distccd"]
trust_set = "toolchain"
anon_exec = "allow"

[labels.tp_sign]
entrypoints = ["/usr/bin/signer", "/usr/local/bin/signer2"]
trust_set = "core"
on_exec = "drop"

[[cdis]]
path = "/srv/build/out"
writers = ["tp_build"]

[[port_authority.rules]]
port = 3632
labels = ["tp_build"]
"""

REORDERED = """\
mode = "enforce"
trust_sets = [ "core", "toolchain" ]
[[port_authority.rules]]
labels = ["tp_build"]
protocol = "tcp"
port = 3632

[[cdis]]
writers = ["tp_build"]
path = "/srv/build/out"
[labels.tp_sign]
on_exec = "drop"
trust_set = "core"
entrypoints = ["/usr/bin/signer", "/usr/local/bin/signer2"]
[labels.tp_build]
anon_exec   =   "allow"
trust_set = "toolchain"
entrypoints = ["/usr/bin/distccd"]
on_exec = "keep"
"""


def test_good_policy_parses_with_defaults() -> None:
    pol = parse_policy(GOOD, source="p.toml")
    assert pol.mode == "enforce" and pol.backend == "auto" and pol.pcr == 10 and pol.scope == "labelled"
    assert pol.trust_sets() == ["core", "toolchain"]
    b = pol.labels["tp_build"]
    assert (b.entrypoints, b.trust_set, b.on_exec, b.anon_exec) == (("/usr/bin/distccd",), "toolchain", "keep", "allow")
    assert pol.labels["tp_sign"].on_exec == "drop" and pol.labels["tp_sign"].anon_exec == "violation"
    # a TP is closed by default: no transitions, no 32-bit syscalls, no io_uring
    assert (b.transitions, b.compat_syscalls, b.io_uring) == ((), "deny", "deny")
    assert pol.cdis[0].path == "/srv/build/out" and pol.cdis[0].writers == ("tp_build",)
    rule = pol.port_authority.rules[0]
    assert (rule.port, rule.protocol, rule.labels) == (3632, "tcp", ("tp_build",))
    # Port Authority defaults: listen, from any peer, on any local address; unlabelled processes unaffected
    assert (rule.op, rule.peers, rule.address) == ("listen", ("0.0.0.0/0", "::/0"), "")
    assert pol.port_authority.unlabelled == "unaffected"


def test_port_authority_keys_enter_the_digest_only_when_set() -> None:
    base = parse_policy(GOOD, source="p.toml")
    assert base.canonical()["port_authority"] == {"rules": [{"port": 3632, "protocol": "tcp", "labels": ["tp_build"]}]}
    narrowed = parse_policy(GOOD.replace("port = 3632", 'port = 3632\npeers = ["10.0.0.0/8", "fd00::/8"]\n'
                                         'address = "127.0.0.1"'), source="p.toml")
    rule = narrowed.port_authority.rules[0]
    assert (rule.peers, rule.address) == (("10.0.0.0/8", "fd00::/8"), "127.0.0.1")
    assert narrowed.digest() != base.digest()
    connect = parse_policy(GOOD.replace("port = 3632", 'port = 3632\nop = "connect"'), source="p.toml")
    assert connect.port_authority.rules[0].op == "connect" and connect.digest() not in (base.digest(), narrowed.digest())


def test_digest_is_stable_over_key_order_whitespace_comments_and_explicit_defaults() -> None:
    a = parse_policy(GOOD, source="a.toml")
    b = parse_policy(REORDERED, source="b.toml")
    assert a.digest() == b.digest() and len(a.digest()) == 32
    assert a == b  # the source is not part of equality


def test_digest_changes_with_meaning() -> None:
    a = parse_policy(GOOD, source="a.toml")
    for extra in ('transitions = ["tp_sign"]', 'compat_syscalls = "allow"', 'io_uring = "allow"'):
        changed = parse_policy(GOOD.replace('anon_exec = "allow"', f'anon_exec = "allow"\n{extra}'), source="a")
        assert changed.digest() != a.digest(), extra
    explicit = 'anon_exec = "allow"\ntransitions = []\ncompat_syscalls = "deny"\nio_uring = "deny"'
    assert parse_policy(GOOD.replace('anon_exec = "allow"', explicit), source="a").digest() == a.digest()
    assert parse_policy(GOOD.replace('mode = "enforce"', 'mode = "audit"'), source="a").digest() != a.digest()
    # trust_sets order fixes the kernel bitmask, so it is meaningful
    assert parse_policy(GOOD.replace('["core", "toolchain"]', '["toolchain", "core"]'), source="a").digest() != a.digest()


@pytest.mark.parametrize(
    "old,new,line,key,message",
    [
        ('anon_exec = "allow"', 'anon_exec = "allow"\nentrypoint = "/x"', 9, "labels.tp_build.entrypoint",
         "unknown key (allowed: anon_exec, compat_syscalls, entrypoints, io_uring, on_exec, transitions, trust_set)"),
        ('trust_set = "toolchain"', 'trust_set = "base"', 7, "labels.tp_build.trust_set",
         "unknown trust set 'base' (defined: core, toolchain)"),
        ('mode = "enforce"', 'mode = "enforcing"', 2, "mode", "'enforcing' is not one of enforce, audit"),
        ('mode = "enforce"', 'mode = "enforce"\npcr = "10"', 3, "pcr", "expected integer, got string"),
        ('mode = "enforce"', 'mode = "enforce"\npcr = 24', 3, "pcr", "24 is not a PCR index (0..23)"),
        ('port = 3632', 'port = 3632\nprot = "tcp"', 21, "port_authority.rules[0].prot",
         "unknown key (allowed: address, labels, op, peers, port, protocol)"),
        ('writers = ["tp_build"]', 'writers = ["tp_nope"]', 17, "cdis[0].writers",
         "unknown label 'tp_nope' (defined: tp_build, tp_sign)"),
        ('entrypoints = ["/usr/bin/distccd"]', 'entrypoints = "/usr/bin/distccd"', 6, "labels.tp_build.entrypoints",
         "expected array, got string"),
        ('entrypoints = ["/usr/bin/distccd"]', 'entrypoints = ["usr/bin/distccd"]', 6, "labels.tp_build.entrypoints",
         "'usr/bin/distccd' is not an absolute path"),
        ('"/usr/local/bin/signer2"]', '"/usr/bin/distccd"]', 11, "labels.tp_sign.entrypoints",
         "'/usr/bin/distccd' is already the entrypoint of label 'tp_build'"),
        ('on_exec = "drop"', 'on_exec = true', 13, "labels.tp_sign.on_exec", "expected string, got boolean"),
        ('[[cdis]]', '[[cdis]]\nmode2 = 1', 16, "cdis[0].mode2", "unknown key (allowed: path, writers)"),
        ('anon_exec = "allow"', 'anon_exec = "allow"\ntransitions = ["tp_nope"]', 9, "labels.tp_build.transitions",
         "unknown label 'tp_nope' (defined: tp_build, tp_sign)"),
        ('anon_exec = "allow"', 'anon_exec = "allow"\ntransitions = ["tp_build"]', 9, "labels.tp_build.transitions",
         "'tp_build' names itself (re-entering its own entrypoint needs no transition)"),
        ('anon_exec = "allow"', 'anon_exec = "allow"\ntransitions = "tp_sign"', 9, "labels.tp_build.transitions",
         "expected array, got string"),
        ('anon_exec = "allow"', 'anon_exec = "allow"\ntransitions = ["tp_sign", "tp_sign"]', 9,
         "labels.tp_build.transitions", "duplicate entries"),
        ('anon_exec = "allow"', 'anon_exec = "allow"\ncompat_syscalls = "permit"', 9, "labels.tp_build.compat_syscalls",
         "'permit' is not one of deny, allow"),
        ('anon_exec = "allow"', 'anon_exec = "allow"\nio_uring = false', 9, "labels.tp_build.io_uring",
         "expected string, got boolean"),
        ('port = 3632', 'port = 3632\nop = "accept"', 21, "port_authority.rules[0].op",
         "'accept' is not one of listen, connect"),
        ('port = 3632', 'port = 3632\npeers = ["10.1.2.3/8"]', 21, "port_authority.rules[0].peers",
         "'10.1.2.3/8': 10.1.2.3/8 has host bits set"),
        ('port = 3632', 'port = 3632\npeers = []', 21, "port_authority.rules[0].peers", "must not be empty"),
        ('port = 3632', 'port = 3632\naddress = "10.0.0.300"', 21, "port_authority.rules[0].address",
         "'10.0.0.300' does not appear to be an IPv4 or IPv6 address"),
        ('port = 3632', 'port = 3632\nop = "connect"\naddress = "10.0.0.1"', 22, "port_authority.rules[0].address",
         'a local address applies to op = "listen" only'),
        ('[[port_authority.rules]]', '[port_authority]\nunlabelled = "deny"\n[[port_authority.rules]]', 20,
         "port_authority.unlabelled", "'deny' is not one of unaffected"),
    ],
)
def test_bad_policies_name_line_and_key(old, new, line, key, message) -> None:
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="bad.toml")
    assert (info.value.line, info.value.key) == (line, key)
    assert str(info.value) == f"bad.toml:{line}: {key}: {message}"


def test_second_array_table_item_is_located() -> None:
    text = GOOD + '\n[[cdis]]\npath = "/srv/b"\nwriters = ["tp_sign"]\ncolour = "red"\n'
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="bad.toml")
    assert (info.value.key, info.value.line) == ("cdis[1].colour", text.splitlines().index('colour = "red"') + 1)


def test_unknown_top_level_table_and_missing_required() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(GOOD + "\n[extras]\nx = 1\n", source="bad.toml")
    assert info.value.key == "extras" and info.value.line == GOOD.count("\n") + 2
    with pytest.raises(PolicyError, match=r"^bad.toml:5: labels.tp_build.trust_set: required key missing$"):
        parse_policy(GOOD.replace('trust_set = "toolchain"\n', ""), source="bad.toml")
    with pytest.raises(PolicyError, match=r"^bad.toml: mode: required key missing$"):
        parse_policy(GOOD.replace('mode = "enforce"\n', ""), source="bad.toml")


def test_toml_syntax_error_has_the_line() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(GOOD.replace('port = 3632', 'port = = 3632'), source="bad.toml")
    assert info.value.line == 20
    assert str(info.value).startswith("bad.toml:20: TOML syntax: ")


def test_multiline_array_does_not_confuse_line_finding() -> None:
    text = GOOD.replace('trust_sets = ["core", "toolchain"]', 'trust_sets = [\n  "core",\n  "toolchain",\n]')
    with pytest.raises(PolicyError) as info:
        parse_policy(text.replace('trust_set = "toolchain"', 'trust_set = "nope"'), source="bad.toml")
    assert info.value.line == 10


def _keys(tmp_path):
    priv = Ed25519PrivateKey.generate()
    pub_pem = tmp_path / "controller.pub"
    pub_pem.write_bytes(priv.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub_pem


def test_signature_roundtrip_raw_and_base64(tmp_path) -> None:
    priv, pub_pem = _keys(tmp_path)
    path = tmp_path / "policy.toml"
    path.write_text(GOOD)
    sig = sign_policy(load_policy(path), priv)
    signature_path(path).write_text(base64.b64encode(sig).decode() + "\n")
    assert load_policy(path, controller_key=pub_pem, require_signature=True).mode == "enforce"
    signature_path(path).write_bytes(sig)
    assert load_policy(path, controller_key=priv.public_key()).mode == "enforce"
    # reformatting does not invalidate: the signature covers the canonical digest
    path.write_text(REORDERED)
    assert load_policy(path, controller_key=pub_pem).digest() == parse_policy(GOOD, source="x").digest()


def test_signature_failures_are_refused(tmp_path) -> None:
    priv, pub_pem = _keys(tmp_path)
    path = tmp_path / "policy.toml"
    path.write_text(GOOD)
    with pytest.raises(PolicyError, match="signature missing"):
        load_policy(path, controller_key=pub_pem)
    with pytest.raises(PolicyError, match="no controller key is configured"):
        load_policy(path, require_signature=True)
    signature_path(path).write_bytes(sign_policy(load_policy(path), Ed25519PrivateKey.generate()))
    with pytest.raises(PolicyError, match="signature does not verify"):
        load_policy(path, controller_key=pub_pem)
    signature_path(path).write_bytes(sign_policy(load_policy(path), priv))
    path.write_text(GOOD.replace('mode = "enforce"', 'mode = "audit"'))
    with pytest.raises(PolicyError, match="signature does not verify"):
        load_policy(path, controller_key=pub_pem)
    signature_path(path).write_text("not base64!")
    with pytest.raises(PolicyError, match="signature malformed"):
        load_policy(path, controller_key=pub_pem)


def test_refusals_carry_their_reason_as_data(tmp_path) -> None:
    """Callers (the service's 403 vs 422) decide on PolicyError.reason, never on the message text."""
    priv, pub_pem = _keys(tmp_path)
    path = tmp_path / "policy.toml"

    def reason(**kw) -> PolicyReason:
        with pytest.raises(PolicyError) as info:
            load_policy(path, **kw)
        return info.value.reason

    assert reason() is PolicyReason.READ
    path.write_text("mode = [")
    assert reason() is PolicyReason.SYNTAX
    path.write_text(GOOD.replace('mode = "enforce"', 'mode = "strict"'))
    assert reason() is PolicyReason.SCHEMA
    path.write_text(GOOD)
    assert reason(controller_key=pub_pem) is PolicyReason.UNSIGNED
    assert reason(require_signature=True) is PolicyReason.UNSIGNED
    signature_path(path).write_text("not base64!")
    assert reason(controller_key=pub_pem) is PolicyReason.SIGNATURE
    signature_path(path).write_bytes(sign_policy(load_policy(path), Ed25519PrivateKey.generate()))
    assert reason(controller_key=pub_pem) is PolicyReason.SIGNATURE
    signature_path(path).write_bytes(sign_policy(load_policy(path), priv))
    assert load_policy(path, controller_key=pub_pem).digest() == parse_policy(GOOD, source="x").digest()


def test_modes_and_exec_rules_are_enums_and_the_digest_is_the_string_form() -> None:
    pol = parse_policy(GOOD, source="x")
    assert pol.mode is Mode.ENFORCE
    assert {lb.on_exec for lb in pol.labels.values()} == {OnExec.KEEP, OnExec.DROP}
    assert {lb.anon_exec for lb in pol.labels.values()} == {AnonExec.ALLOW, AnonExec.VIOLATION}
    assert pol.canonical()["mode"] == "enforce" and type(pol.canonical()["mode"]) is str
    # pinned: the canonical digest did not change when the values became enums (signatures stay valid)
    assert pol.digest().hex() == "837877ab6725a4fcdea7ae5594d2af07243d4514aac55682eb66bbdf914f3ad4"
