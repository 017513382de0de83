"""The verifier's verdict per entry, one row per rule (no TPM: entries made with imalog.LogEntry.new)."""
from __future__ import annotations

import pytest

from controlplane.core import imalog
from controlplane.core.imalog import replay_to
from controlplane.core.events import Event, EventKind, alive_digest
from controlplane.core.policy import parse_policy
from controlplane.core.selinux_render import render
from controlplane.verifier.judge import Facts, Judge, Reference
from prima.measuredb import MeasureDB
from tests.attest_fixtures import reference  # noqa: F401

BOOT = b"\xbb" * 32


@pytest.fixture
def judge(reference):
    ref = reference.open()
    yield Judge(ref, Facts(), pcr=10, boot_aggregate=BOOT), reference, ref
    ref.db.close()


def _entry(index, event, pcr=10):
    return imalog.LogEntry.new(index, pcr, event.digest, event.ima_name())


def test_each_rule(judge):
    j, files, ref = judge
    cc = next(p for p in files.trusted if p.endswith("/cc"))
    rows = [
        (Event(EventKind.BOOT_AGGREGATE, BOOT), "trusted", ""),
        (Event(EventKind.DAEMON_START, subject="prima/tracepoint"), "trusted", ""),
        (Event(EventKind.POLICY_LOAD, ref.policy_digest), "trusted", ""),
        (Event(EventKind.DB_LOAD, ref.db_digest), "trusted", ""),
        (Event(EventKind.TLS_KEY, b"\x01" * 32, op="serve"), "info", ""),
        (Event(EventKind.LABEL_TRANSITION, files.trusted[files.entry], "tp_build", "exec", files.entry), "trusted", ""),
        (Event(EventKind.TRUSTED_LOAD, files.trusted[cc], "tp_build", "exec", cc), "trusted", ""),
        (Event(EventKind.TRUSTED_LOAD, b"\x02" * 32, "tp_build", "exec", "/tmp/x"), "untrusted", "not-in-db"),
        (Event(EventKind.TRUSTED_LOAD, files.trusted[cc], "tp_other", "exec", cc), "untrusted", "unknown-label"),
        (Event(EventKind.LABEL_TRANSITION, files.trusted[cc], "tp_build", "exec", cc), "untrusted", "entrypoint"),
        (Event(EventKind.VIOLATION, label="tp_build", op="mmap", subject="/tmp/lib.so"), "untrusted", "violation"),
        (Event(EventKind.LOST_EVENTS, subject="ringbuf: 3"), "untrusted", "lost-events"),
        (Event(EventKind.POLICY_LOAD, b"\x03" * 32), "untrusted", "policy"),
        (Event(EventKind.DB_LOAD, b"\x04" * 32), "untrusted", "db"),
        (Event(EventKind.DAEMON_START, subject="prima/tracepoint"), "untrusted", "enforcement-gap"),
        (Event(EventKind.DAEMON_STOP, subject="prima/tracepoint"), "untrusted", "enforcement-stopped"),
        (Event(EventKind.BOOT_AGGREGATE, BOOT), "untrusted", "boot-aggregate-position"),
        (Event(EventKind.SELINUX_LOAD, bytes.fromhex(render(ref.policy).digest()), op="cwlite",
               subject="/var/lib/selinux/default"), "trusted", ""),
        (Event(EventKind.SELINUX_LOAD, b"\x06" * 32, op="cwlite", subject="/var/lib/selinux/default"),
         "untrusted", "selinux-module"),
    ]
    got = [(v.verdict, v.reason) for v in (j.judge(_entry(i, e)) for i, (e, _, _) in enumerate(rows))]
    assert got == [(v, r) for _, v, r in rows]
    assert j.facts.untrusted == sum(1 for _, v, _ in rows if v == "untrusted")
    assert j.judge(imalog.LogEntry.new(99, 10, b"\x05" * 32, "/usr/bin/ls")).reason == "unknown-entry"
    assert j.judge(_entry(100, Event(EventKind.TLS_KEY, b"\x01" * 32), pcr=11)).reason == "wrong-pcr"


def test_boot_aggregate_must_match_the_quoted_pcrs(judge):
    j, _, _ = judge
    assert j.judge(_entry(0, Event(EventKind.BOOT_AGGREGATE, b"\xcc" * 32))).reason == "boot-aggregate"


def test_overall_conditions(judge):
    j, _, ref = judge
    assert set(j.overall(b"\x01" * 32)) == {
        "no boot_aggregate entry", "enforcement not running (no daemon-start, or stopped)",
        f"active policy none is not the verifier's {ref.policy_digest.hex()[:16]}",
        "the TLS key of this channel was never logged"}


def test_replay_to_finds_the_quoted_prefix_from_any_verified_state():
    entries = [_entry(i, Event(EventKind.TLS_KEY, bytes([i]) * 32)) for i in range(6)]
    values = imalog.replay_prefixes(entries, 10)
    assert replay_to(entries, bytes(32), values[4], 10) == 4
    assert replay_to(entries[2:], values[2], values[6], 10) == 4          # incremental, from entry 2
    assert replay_to(entries[2:], values[2], values[2], 10) == 0
    assert replay_to(entries[:3] + entries[4:], bytes(32), values[6], 10) is None   # one removed


def test_label_transitions_are_checked_against_the_declared_ones(reference):
    """Entering a label from another one is trusted only along a transition the left label declares."""
    cc = next(p for p in reference.trusted if p.endswith("/cc"))
    text = (f'mode = "enforce"\ntrust_sets = ["toolchain"]\n'
            f'[labels.tp_build]\nentrypoints = ["{reference.entry}"]\ntrust_set = "toolchain"\ntransitions = ["tp_cc"]\n'
            f'[labels.tp_cc]\nentrypoints = ["{cc}"]\ntrust_set = "toolchain"\n'
            f'[labels.tp_drop]\nentrypoints = ["/usr/bin/drop"]\ntrust_set = "toolchain"\non_exec = "drop"\n')
    with MeasureDB.open(reference.db_path) as db:
        j = Judge(Reference(parse_policy(text, source="t.toml"), db), Facts(), pcr=10)
        d_cc, d_entry = reference.trusted[cc], reference.trusted[reference.entry]
        rows = [
            (Event(EventKind.LABEL_TRANSITION, d_cc, "tp_cc", "exec-from-tp_build", cc), "trusted", ""),
            (Event(EventKind.LABEL_TRANSITION, d_entry, "tp_build", "exec-from-tp_cc", reference.entry),
             "untrusted", "undeclared-transition"),
            (Event(EventKind.LABEL_TRANSITION, d_cc, "tp_cc", "exec-from-tp_nope", cc), "untrusted", "undeclared-transition"),
            (Event(EventKind.LABEL_TRANSITION, d_cc, "tp_cc", "exec-from-tp_build", reference.entry), "untrusted", "entrypoint"),
            (Event(EventKind.LABEL_TRANSITION, d_cc, "tp_cc", "exec", cc), "trusted", ""),
            (Event(EventKind.LABEL_TRANSITION, d_cc, "tp_cc", "sideways", cc), "untrusted", "unknown-entry"),
            (Event(EventKind.LABEL_TRANSITION, d_cc, "tp_drop", "drop", cc), "trusted", ""),
            (Event(EventKind.LABEL_TRANSITION, d_cc, "tp_build", "drop", cc), "untrusted", "drop"),
        ]
        got = [(v.verdict, v.reason) for v in (j.judge(_entry(i, e)) for i, (e, _, _) in enumerate(rows))]
    assert got == [(v, r) for _, v, r in rows]


@pytest.mark.parametrize("logged, silent", [("this", False), ("other", True), ("none", True)])
def test_a_running_engine_must_answer_this_rounds_nonce(reference, logged, silent):
    """A live service in front of a dead engine: no engine-alive entry for the nonce -> a reason."""
    ref = reference.open()
    try:
        nonce = b"\x42" * 32
        j = Judge(ref, Facts(), pcr=10, boot_aggregate=BOOT, nonce=nonce)
        events = [Event(EventKind.BOOT_AGGREGATE, BOOT), Event(EventKind.DAEMON_START, subject="prima/tracepoint"),
                  Event(EventKind.POLICY_LOAD, ref.policy_digest), Event(EventKind.DB_LOAD, ref.db_digest)]
        if logged != "none":
            other = nonce if logged == "this" else b"\x43" * 32
            events.append(Event(EventKind.ENGINE_ALIVE, alive_digest(other), op="alive", subject="prima/tp events=3"))
        verdicts = [j.judge(_entry(i, e)) for i, e in enumerate(events)]
        assert all(v.verdict != "untrusted" for v in verdicts)
        reasons = j.overall(None)
        assert any("no engine-alive entry" in r for r in reasons) == silent, reasons
    finally:
        ref.db.close()


def test_port_authority_entries(reference):
    """A listener needs a listen rule of the verifier's policy and a trusted program; refusals a TP made
    itself are violations, refusals of network input are information, anything let through is not."""
    from controlplane.core.events import PaSubject

    reference.policy_path.write_text(reference.policy_path.read_text() +
                                     '[[port_authority.rules]]\nport = 3632\nlabels = ["tp_build"]\n')
    ref = reference.open()
    try:
        j = Judge(ref, Facts(), pcr=10)
        entry_digest = reference.trusted[reference.entry]
        rows = [
            (Event(EventKind.PA_LISTENER, entry_digest, "tp_build", "listen",
                   PaSubject("tcp", 3632, 1, exe=reference.entry).text()), "trusted", ""),
            (Event(EventKind.PA_LISTENER, entry_digest, "tp_build", "listen",
                   PaSubject("tcp", 4000, 0, exe=reference.entry).text()), "untrusted", "pa-listener-outside-rules"),
            (Event(EventKind.PA_LISTENER, b"\x09" * 32, "tp_build", "listen",
                   PaSubject("tcp", 3632, 1, exe="/tmp/other").text()), "untrusted", "not-in-db"),
            (Event(EventKind.PA_REFUSED, label="tp_build", op="bind",
                   subject=PaSubject("tcp", 4000, 0, "no-rule", "denied", 1).text()), "untrusted", "pa-bind-refused"),
            (Event(EventKind.PA_REFUSED, label="tp_build", op="socket",
                   subject=PaSubject("0", 0, 0, "proto", "killed", 1).text()), "untrusted", "pa-socket-refused"),
            (Event(EventKind.PA_REFUSED, label="tp_build", op="hold",
                   subject=PaSubject("0", 0, 0, "foreign", "killed", 1).text()), "untrusted", "pa-hold-refused"),
            (Event(EventKind.PA_REFUSED, label="tp_build", op="receive",
                   subject=PaSubject("tcp", 3632, 1, "peer", "denied", 7).text()), "info", ""),
            (Event(EventKind.PA_REFUSED, op="packet",
                   subject=PaSubject("udp", 3632, 2, "peer", "denied", 100000).text()), "info", ""),
            (Event(EventKind.PA_REFUSED, label="tp_build", op="receive",
                   subject=PaSubject("tcp", 3632, 1, "peer", "allowed", 3).text()), "untrusted", "pa-receive-outside-rules"),
            (Event(EventKind.PA_REFUSED, label="tp_build", op="receive", subject="garbage"), "untrusted", "unknown-entry"),
        ]
        got = [(v.verdict, v.reason) for v in (j.judge(_entry(i, e)) for i, (e, _, _) in enumerate(rows))]
        assert got == [(v, r) for _, v, r in rows]
        assert j.facts.listeners[0] == f"tp_build tcp/3632 {entry_digest.hex()}" and len(j.facts.listeners) == 3
    finally:
        ref.db.close()
