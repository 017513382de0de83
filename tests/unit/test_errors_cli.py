"""The CLI's error rule: one line on stderr naming what is wrong, exit 1; traceback only with --debug."""
from __future__ import annotations

import subprocess
import sys

import pytest

from controlplane.cli.main import main
from controlplane.core.errors import BtfError, CwliteError, KernelError, VerifyError


def test_hierarchy_is_one_family() -> None:
    assert issubclass(BtfError, KernelError) and issubclass(KernelError, CwliteError)
    assert VerifyError("x", reason="nonce").reason == "nonce"


def test_error_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["debug", "ebpf", "no-such.bpf.c"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("cwlite: error: ebpf/no-such.bpf.c: no such BPF source")


def test_debug_flag_shows_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "--debug", "debug", "ebpf", "no-such.bpf.c"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "KernelError" in proc.stderr


def test_help_ends_with_examples() -> None:
    proc = subprocess.run([sys.executable, "-m", "controlplane.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "cwlite status --json" in proc.stdout


def test_unknown_command_is_usage_error() -> None:
    assert main(["no-such-command"]) == 2
