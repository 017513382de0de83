"""The loader and `cwlite status` on the host kernel: real programs compiled, loaded, attached."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from controlplane.core.errors import BpfCompileError
import ebpf
from ebpf import loader
from tests.conftest import requires

pytestmark = requires(root=True)


def test_tracepoint_program_compiles_attaches_and_counts_a_real_exec() -> None:
    bpf = loader.load("probe.bpf.c")
    try:
        child = subprocess.Popen(["/bin/true"])
        child.wait()
        hits = bpf["cwl_probe_execs"][bpf["cwl_probe_execs"].Key(child.pid)]
        assert hits.value == 1
    finally:
        bpf.cleanup()


def test_offsets_reach_the_compiler() -> None:
    prog = loader.render("probe.bpf.c", ["-DEXTRA=1"])
    assert any(f.startswith("-DCWL_OFF_FILE_F_INODE=") for f in prog.cflags)
    assert prog.cflags[-1] == "-DEXTRA=1"


def test_syntax_error_names_the_source_line(tmp_path, monkeypatch) -> None:
    src = tmp_path / "broken.bpf.c"
    src.write_text('#include "cwlite.h"\n\nint f(void *ctx)\n{\n\treturn undeclared_thing;\n}\n')
    monkeypatch.setattr(loader, "source_dir", lambda: tmp_path)
    (tmp_path / "cwlite.h").write_text((ebpf.source_dir() / "cwlite.h").read_text())
    with pytest.raises(BpfCompileError) as info:
        loader.load("broken.bpf.c")
    assert info.value.line == 5
    assert str(info.value).startswith("ebpf/broken.bpf.c:5: use of undeclared identifier 'undeclared_thing'")


def test_missing_offsets_refuse_to_compile() -> None:
    prog = loader.Program(name="probe.bpf.c", text=loader.render("probe.bpf.c").text, cflags=(f"-I{loader.source_dir()}",))
    with pytest.raises(BpfCompileError, match="CWL_OFF_FILE_F_INODE missing"):
        loader.compile_program(prog)


def test_status_json_says_what_this_kernel_allows() -> None:
    proc = subprocess.run([sys.executable, "-m", "controlplane.cli", "status", "--json"], capture_output=True, text=True, check=True)
    status = json.loads(proc.stdout)
    assert status["btf"]["present"] is True
    assert status["tracepoint"]["ok"] is True
    # The backend follows from what really loaded, never from the LSM list.
    assert status["backend"] == ("lsm" if status["lsm"]["bpf_loadable"] else "tracepoint")
    if not status["lsm"]["bpf_loadable"]:
        assert "Operation not permitted" in status["lsm"]["detail"]


def test_file_identity_read_in_bpf_matches_stat(tmp_path) -> None:
    """The kernel's (dev, ino, ctime) of an exec'd image, read through BTF offsets, equals stat()'s."""
    import os
    import shutil

    exe = tmp_path / "true-copy"
    shutil.copy2("/bin/true", exe)
    st = os.stat(exe)
    bpf = loader.load("probe.bpf.c")
    try:
        child = subprocess.Popen([str(exe)])
        child.wait()
        ident = bpf["cwl_probe_exe"][bpf["cwl_probe_exe"].Key(child.pid)]
    finally:
        bpf.cleanup()
    assert ident.ino == st.st_ino
    assert ident.ctime_ns == st.st_ctime_ns
    assert ident.dev == (os.major(st.st_dev) << 20 | os.minor(st.st_dev))
