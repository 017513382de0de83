"""ebpf.abi: every CWL_* constant of cwlite.h/cdi.h read once, and the event words prima.engine decodes with.

(That each value is what clang sees: tests/kernel/test_prima_layout.py.)
"""
from __future__ import annotations

import re

import pytest

from controlplane.core.errors import KernelError
from controlplane.core.events import EventKind
from ebpf import abi, loader
from prima import engine


def test_every_object_like_define_of_the_headers_is_read() -> None:
    for header in abi.HEADERS:
        text = (loader.source_dir() / header).read_text()
        # Every "#define CWL_NAME something" that is not function-like (NAME followed by "(").
        valued = set(re.findall(r"^\s*#\s*define\s+(CWL_\w+)[ \t]+[^\s(/]", text, re.MULTILINE))
        assert valued, header
        assert valued <= set(abi.constants()), f"{header}: not read: {sorted(valued - set(abi.constants()))}"


def test_literals_in_every_c_form() -> None:
    text = ("#define CWL_A 12\n#define CWL_B 0x1F /* hex */\n#define CWL_C 0170000\n#define CWL_D 255UL // suffix\n"
            "#  define CWL_E 0\n#define CWL_GUARD_H\n#define CWL_FN(x) ((x) + 1)\n#define OTHER 5\n")
    assert abi.parse_defines(text, "t.h") == {"CWL_A": 12, "CWL_B": 31, "CWL_C": 0o170000, "CWL_D": 255, "CWL_E": 0}


@pytest.mark.parametrize("line, message", [
    ("#define CWL_X (1 << 3)", r"^t\.h:2: CWL_X: value '\(1 << 3\)' is not an integer literal"),
    ("#define CWL_X CWL_Y", r"^t\.h:2: CWL_X: value 'CWL_Y' is not an integer literal"),
    ("#define CWL_A 2", r"^t\.h:2: CWL_A: defined twice \(1, 2\)"),
])
def test_what_cannot_be_read_without_a_preprocessor_is_refused(line: str, message: str) -> None:
    with pytest.raises(KernelError, match=message):
        abi.parse_defines(f"#define CWL_A 1\n{line}\n", "t.h")


def test_a_missing_name_names_the_headers() -> None:
    with pytest.raises(KernelError, match=r"^CWL_NO_SUCH: not defined in ebpf/cwlite\.h, ebpf/cdi\.h, ebpf/selfprotect\.h$"):
        abi.value("CWL_NO_SUCH")


def test_engine_decodes_every_event_number_the_headers_define() -> None:
    c = abi.constants()
    assert {c[f"CWL_EV_{k.name}"]: k for k in (EventKind.TRUSTED_LOAD, EventKind.LABEL_TRANSITION, EventKind.VIOLATION)} == engine.KINDS
    assert set(engine.OPS) == {v for n, v in c.items() if n.startswith("CWL_OP_")}
    assert set(engine.WHYS) == {v for n, v in c.items() if n.startswith("CWL_WHY_")}
    assert set(engine.DROPS) == {v for n, v in c.items() if n.startswith("CWL_DROP_") and n != "CWL_DROP_MAX"}
    assert max(engine.DROPS) < engine.DROP_MAX == c["CWL_DROP_MAX"]
    # The words the measurement log and the verifier already know.
    assert engine.OPS[c["CWL_OP_ANON_EXEC"]] == "anon-exec" and engine.OPS[c["CWL_OP_CDI_OPEN_WRITE"]] == "open-write"
    assert {engine.OPS[c[f"CWL_OP_CDI_{n}"]] for n in ("OPEN_WRITE", "CREATE", "LINK", "UNLINK", "RENAME", "SETATTR")} == \
        {"open-write", "create", "link", "unlink", "rename", "setattr"}
    assert engine.WHYS[c["CWL_WHY_UNKNOWN"]] == "unmeasured" and engine.WHYS[c["CWL_WHY_CDI_NOT_WRITER"]] == "not-writer"
    assert engine.WHYS[c["CWL_WHY_NONE"]] == "" and engine.ACTIONS[c["CWL_ACT_KILLED"]] == "killed"
    assert engine.DROPS[c["CWL_DROP_SEEN"]] == "seen-map" and engine.DROPS[c["CWL_DROP_CDI"]] == "cdi-map"
    # Every word a name-specific entry gives is for a name that exists (no stale entry after a rename).
    assert set(engine.WORDS) <= set(c)
