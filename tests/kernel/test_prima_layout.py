"""The Python views of cwlite.h match clang's: `struct cwl_event`'s layout (bcc's own ctypes), every CWL_* value."""
from __future__ import annotations

import ctypes
import shutil

import pytest

from controlplane.core.errors import BpfCompileError
from ebpf import abi, loader
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


def test_every_abi_constant_is_what_clang_sees(tmp_path, monkeypatch) -> None:
    """ebpf.abi parses the headers' text; clang compiles them: each value must be the same (a _Static_assert each)."""
    src = loader.source_dir()
    for header in abi.HEADERS:
        shutil.copy2(src / header, tmp_path / header)
    checks = "".join(f'_Static_assert({name} == {value}ULL, "ebpf.abi: {name} is not {value}");\n'
                     for name, value in sorted(abi.constants().items()))
    includes = "".join(f'#include "{header}"\n' for header in abi.HEADERS)
    (tmp_path / "abi.bpf.c").write_text(includes + checks +
                                        'int cwl_abi(void *ctx) { return 0; }\n')
    monkeypatch.setattr(loader, "source_dir", lambda: tmp_path)
    bpf = loader.load("abi.bpf.c", ["-DCWL_CDI_MAX=1"])
    bpf.cleanup()
    # The check can fail: a wrong value is a compile error naming the constant.
    (tmp_path / "abi.bpf.c").write_text('#include "cwlite.h"\n_Static_assert(CWL_OP_EXEC == 99ULL, "ebpf.abi: CWL_OP_EXEC is not 99");\n')
    with pytest.raises(BpfCompileError, match="CWL_OP_EXEC is not 99"):
        loader.load("abi.bpf.c")
