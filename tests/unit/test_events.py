from __future__ import annotations

from hypothesis import given, strategies as st

from controlplane.core.events import Event, EventKind, parse_ima_name


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
