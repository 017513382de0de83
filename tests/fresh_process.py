"""Run a test module's tests in a fresh interpreter.

Why: the slices these modules start run PRIMA and Port Authority inside the test's Python process,
and bcc keeps a process's shared tables (Port Authority's "extern" cwl_task_labels) under the fd of
the FIRST engine that declared them. In a pytest process where earlier tests opened and closed
engines, Port Authority would get a stale fd (seen: the kernel refused pa_sock_create, whose map was
another engine's cwl_trust_t). The daemon runs one engine per process, as these runs then do; the
README's Port Authority section lists the limit.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

FRESH = "CWLITE_FRESH_PROCESS"

# on the module's real tests: they run only inside the fresh interpreter
fresh_only = pytest.mark.skipif(not os.environ.get(FRESH), reason="runs in a fresh interpreter (test_in_a_fresh_process)")
# on the one test that starts it
outside_only = pytest.mark.skipif(bool(os.environ.get(FRESH)), reason="inside the fresh interpreter")


def run_in_fresh_process(module_file: str, tests: int, timeout: float = 1800) -> None:
    """pytest on `module_file` in a new interpreter; all `tests` of it must pass."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module_file],
                          env={**os.environ, FRESH: "1"}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and re.search(rf"\b{tests} passed", proc.stdout), proc.stdout[-6000:] + proc.stderr[-2000:]
