from __future__ import annotations

from hypothesis import given, strategies as st

from controlplane.core.events import Event, EventKind, parse_ima_name, transition_op, transition_source


@given(
    kind=st.sampled_from([k for k in EventKind if k is not EventKind.BOOT_AGGREGATE]),
    label=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", max_size=12),
    op=st.sampled_from(["", "exec", "mmap", "mprotect"]),
    subject=st.text(max_size=40).filter(lambda s: "\n" not in s and "\0" not in s),
)
def test_name_round_trips_any_subject(kind, label, op, subject) -> None:
    ev = Event(kind, bytes(range(32)), label, op, subject)
    back = parse_ima_name(ev.digest, ev.ima_name())
    assert back == Event(kind, ev.digest, label, op, subject)


def test_foreign_names_are_not_cwlite_events() -> None:
    assert parse_ima_name(bytes(32), "/usr/bin/bash") is None
    assert parse_ima_name(bytes(32), "cwlite:no-such-kind:-:-:x") is None
    assert parse_ima_name(bytes(32), "boot_aggregate").kind is EventKind.BOOT_AGGREGATE


def test_a_transition_between_labels_names_the_label_left_in_its_op():
    assert transition_op("") == "exec" and transition_source("exec") == ""
    assert transition_op("tp_build") == "exec-from-tp_build" and transition_source("exec-from-tp_build") == "tp_build"
    ev = Event(EventKind.LABEL_TRANSITION, b"\x01" * 32, "tp_cc", transition_op("tp_build"), "/usr/bin/cc")
    back = parse_ima_name(ev.digest, ev.ima_name())
    assert back is not None and transition_source(back.op) == "tp_build" and back.label == "tp_cc"
