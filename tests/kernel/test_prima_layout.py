"""The Python view of `struct cwl_event` matches the layout clang gives it (bcc's own ctypes of the header)."""
from __future__ import annotations

import ctypes
import shutil

from ebpf import loader
from prima.engine import CwlEvent
from tests.conftest import requires

pytestmark = requires(root=True)


def test_cwl_event_layout_matches_the_header(tmp_path, monkeypatch) -> None:
    src = loader.source_dir()
    shutil.copy2(src / "cwlite.h", tmp_path / "cwlite.h")
    (tmp_path / "layout.bpf.c").write_text('#include "cwlite.h"\nBPF_ARRAY(cwl_layout_event, struct cwl_event, 1);\n'
                                           'int cwl_layout(void *ctx) { return 0; }\n')
    monkeypatch.setattr(loader, "source_dir", lambda: tmp_path)
    bpf = loader.load("layout.bpf.c")
    try:
        leaf = bpf[b"cwl_layout_event"].Leaf
        assert ctypes.sizeof(leaf) == ctypes.sizeof(CwlEvent) == 240
        theirs = {name: (getattr(leaf, name).offset, getattr(leaf, name).size) for name, *_ in leaf._fields_}
        ours = {name: (getattr(CwlEvent, name).offset, getattr(CwlEvent, name).size) for name, *_ in CwlEvent._fields_}
        assert theirs == ours
    finally:
        bpf.cleanup()
