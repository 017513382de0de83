"""`make deb`: the .deb built with dpkg-buildpackage (debhelper + pybuild) holds the service, and it runs.

Builds the package from this tree (about 7 min on the loaded 2-core machine:
pybuild, cext's cffi modules, the bundled dependencies from pip), then checks
what `dpkg -c` lists (units, a man page per command, the config, the data
directory root-only), that `systemd-analyze verify` accepts the units in the
unpacked tree, and that the unpacked payload runs with Debian's python3 and
bcc (`cwlite --version`, `cwlite status --json`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from controlplane.cli.main import cli
from tests.conftest import requires

pytestmark = [requires(root=True), requires(tool="dpkg-buildpackage"), pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
UNITS = ("cwlite-attest.service", "cwlite-enforce.service", "cwlite-selinux.service")


def _commands(cmd: click.Command, path: list[str]) -> list[str]:
    out = ["-".join(path)]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            if not sub.hidden:
                out += _commands(sub, path + [name])
    return out


@pytest.fixture(scope="module")
def deb() -> Path:
    proc = subprocess.run(["make", "deb"], cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (pkg,) = (REPO / "build/deb").glob("cwlite_*_amd64.deb")
    return pkg


def test_the_deb_lists_units_man_pages_config_and_a_private_data_dir(deb: Path) -> None:
    listing = subprocess.run(["dpkg", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    rows = {line.split()[-1].lstrip("."): line.split()[0] for line in listing.splitlines()}
    for unit in UNITS:
        assert rows[f"/lib/systemd/system/{unit}"] == "-rw-r--r--"
    pages = {m.group(1) for m in re.finditer(r"/usr/share/man/man1/(cwlite[\w-]*)\.1\.gz$", listing, re.M)}
    assert pages == set(_commands(cli, ["cwlite"]))            # one page per command, nothing stale
    assert rows["/var/lib/cwlite/"] == "drwx------"            # the log, swtpm state and keys: root only
    assert rows["/etc/cwlite/cwlite.toml"] == "-rw-r--r--"
    assert rows["/usr/bin/cwlite"] == "-rwxr-xr-x"
    assert any(p.endswith("/cext/_btf.abi3.so") or re.search(r"/cext/_btf\..*\.so$", p) for p in rows)
    info = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True).stdout
    # bpftool: the lsm backend reads its hooks' parameters with it; the device TCTI: /dev/tpmrm0
    assert {"python3-bpfcc", "swtpm", "libbpf1", "bpftool", "libtss2-tcti-device0"} <= {
        d.strip().split()[0] for d in info.split(",")}
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"/etc/cwlite/cwlite.toml" in conffiles


def test_the_units_verify_and_the_payload_runs(deb: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    # systemd-analyze resolves the units' dependencies and ExecStart binaries inside --root
    shutil.copytree("/lib/systemd/system", root / "lib/systemd/system", dirs_exist_ok=True, symlinks=True)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2("/bin/kill", root / "bin/kill")
    proc = subprocess.run(["systemd-analyze", f"--root={root}", "--man=no", "verify",
                           *(str(root / "lib/systemd/system" / u) for u in UNITS)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    unit = (root / "lib/systemd/system/cwlite-attest.service").read_text()
    assert "Before=distcc.service" in unit and "Restart=on-failure" in unit and "RequiredBy=distcc.service" in unit
    # the payload as installed, with Debian's python3 (and its bcc): the bundled dependencies first
    site = next((root / "usr/lib").glob("python3*/dist-packages"))
    env = dict(os.environ, PYTHONPATH=f"{root}/usr/lib/cwlite/python:{site}", CWLITE_CONFIG=str(root / "etc/cwlite/cwlite.toml"))
    version = subprocess.run(["/usr/bin/python3", "-m", "controlplane.cli", "--version"], env=env, cwd="/",
                             capture_output=True, text=True, timeout=300)
    assert version.returncode == 0 and version.stdout.startswith("cwlite "), version.stderr
    status = subprocess.run(["/usr/bin/python3", "-m", "controlplane.cli", "status", "--json"], env=env, cwd="/",
                            capture_output=True, text=True, timeout=600)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["backend"] in ("lsm", "tracepoint")
    where = subprocess.run(["/usr/bin/python3", "-c", "import controlplane, fastapi; print(controlplane.__file__, "
                            "fastapi.__file__)"], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert all(Path(p).is_relative_to(root) for p in where.stdout.split()), where.stdout   # the package's, not the tree's
