"""The verifier runs where there is no TPM stack, no bcc and no web server: it imports core only."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import controlplane.verifier

BLOCKED = ("bcc", "tpm2_pytss", "fastapi", "uvicorn", "starlette", "pydantic")
HIGHER = ("controlplane.host", "controlplane.cli", "prima", "ebpf", "cext", "portauthority")

# Runs in a fresh interpreter: a finder that refuses the blocked packages is installed before any import.
PROBE = """
import importlib, sys

BLOCKED = {blocked!r}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed here (blocked by the test)")
        return None

sys.meta_path.insert(0, Refuse())
for module in {modules!r}:
    importlib.import_module(module)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith({higher!r}))
print("\\n".join(loaded))
"""


def verifier_modules() -> list[str]:
    return sorted(f"controlplane.verifier.{m.name}" for m in pkgutil.iter_modules(controlplane.verifier.__path__))


def test_every_verifier_module_imports_without_bcc_tpm2_pytss_fastapi_uvicorn():
    modules = verifier_modules()
    assert {"controlplane.verifier.attest", "controlplane.verifier.judge", "controlplane.verifier.store"} <= set(modules)
    probe = PROBE.format(blocked=BLOCKED, modules=modules, higher=HIGHER)
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [], f"the verifier pulled in: {run.stdout.split()}"


def test_the_probe_refuses_what_it_blocks():
    """The finder really blocks: importing a blocked package through it fails (the test above can fail)."""
    probe = PROBE.format(blocked=BLOCKED, modules=["fastapi"], higher=HIGHER)
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "blocked by the test" in run.stderr
