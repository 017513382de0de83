"""The layers of DESIGN.md ("Layers"): imports point down only.

The contracts live in pyproject.toml ([tool.importlinter]); this runs them as
part of the unit tier so an import that points up a layer fails `make test`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_every_layer_contract_is_kept() -> None:
    proc = _lint(ROOT / "pyproject.toml")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contract can fail: a core module that imports the host layer is refused."""
    tree = tmp_path / "tree"
    common = shutil.ignore_patterns(".git", ".venv", "tests", "__pycache__", "*.so")
    # the top-level build/ (`make deb`'s output), not controlplane/build (the build controller)
    shutil.copytree(ROOT, tree, ignore=lambda d, names: common(d, names) | ({"build"} if Path(d) == ROOT else set()))
    errors = tree / "controlplane" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom controlplane.host import mlog  # noqa: E402,F401\n")
    proc = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")], cwd=tree,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)})
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "controlplane.core is not allowed to import controlplane.host" in proc.stdout

