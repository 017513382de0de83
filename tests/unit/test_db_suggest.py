"""`db suggest`'s parts that need no kernel: reading violations, and the rebuild command per recorded source."""
from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.core import imalog
from controlplane.core.errors import MeasureDBError
from controlplane.core.events import Event, EventKind
from prima.suggest import build_commands, violations_from_events, violations_from_log

DB = "/var/lib/cwlite/measure.db"


def test_violations_from_the_log_and_from_events() -> None:
    events = [Event(EventKind.TRUSTED_LOAD, b"\x01" * 32, "tp_build", "exec", "/usr/bin/cc"),
              Event(EventKind.VIOLATION, label="tp_build", op="mmap", subject="/usr/lib/llvm-14/lib/LLVMgold.so"),
              Event(EventKind.VIOLATION, label="tp_build", op="ptrace", subject="tgid=1(a,-)->tgid=2(tp_build)")]
    entries = [imalog.LogEntry.new(i, 10, e.digest, e.ima_name()) for i, e in enumerate(events)]
    got = violations_from_log(imalog.parse_any(imalog.to_ascii(entries).encode()))
    assert [(v.label, v.op, v.path) for v in got] == [("tp_build", "mmap", "/usr/lib/llvm-14/lib/LLVMgold.so"),
                                                       ("tp_build", "ptrace", "tgid=1(a,-)->tgid=2(tp_build)")]
    lines = ['{"kind": "violation", "label": "tp_build", "op": "exec", "subject": "/x", "detail": {"why": "unmeasured", "ino": 7}}',
             '', '{"kind": "daemon-start", "label": "", "op": "", "subject": "prima/tracepoint", "detail": {}}']
    (v,) = violations_from_events(lines, "ev.jsonl")
    assert (v.path, v.why, v.ino) == ("/x", "unmeasured", 7)
    with pytest.raises(MeasureDBError, match=r"^ev.jsonl:2: not a cwlite event line"):
        violations_from_events(['{"kind": "tls-key"}', '{"kind": "violation"}'], "ev.jsonl")


@pytest.mark.parametrize(("sources", "note", "want", "already"), [
    # a new trust set: the installed packages, from dpkg
    (None, "", [["cwlite", "db", "build", "--db", DB, "--trust-set", "t", "--from-dpkg", "libllvm14", "llvm-14-linker-tools"]], []),
    # built from dpkg names and a directory: the same, plus the new names
    ({"dpkg": ["gcc-12", "make"], "deb": [], "dir": ["/opt/site"]}, "ci",
     [["cwlite", "db", "build", "--db", DB, "--trust-set", "t", "--note", "ci", "--from-dpkg", "gcc-12", "libllvm14",
       "llvm-14-linker-tools", "make", "--from-dir", "/opt/site"]], []),
    # built from .debs: the installed versions downloaded into its directory, then the signed chain
    ({"dpkg": [], "deb": ["/srv/debs", "packages: binutils libllvm14"], "dir": []}, "",
     [["sh", "-c", "cd /srv/debs && apt-get download llvm-14-linker-tools=1:14.0.6-12"],
      ["cwlite", "db", "build", "--db", DB, "--trust-set", "t", "--from-deb", "/srv/debs", "binutils", "libllvm14",
       "llvm-14-linker-tools"]], ["libllvm14"]),
    # every installed package already: nothing to add, the file is not what dpkg measured
    ({"dpkg": True, "deb": [], "dir": []}, "", [["cwlite", "db", "build", "--db", DB, "--trust-set", "t", "--from-dpkg"]],
     ["libllvm14", "llvm-14-linker-tools"]),
])
def test_rebuild_command_per_recorded_source(sources, note, want, already) -> None:
    versions = {"libllvm14": "1:14.0.6-12", "llvm-14-linker-tools": "1:14.0.6-12"}
    cmds, have = build_commands("t", sorted(versions), versions, db_path=Path(DB), sources=sources, note=note)
    assert (cmds, have) == (want, already)
