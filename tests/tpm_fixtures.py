"""Real-swtpm fixtures for any test that needs a TPM (import them, or list this module in `pytest_plugins`).

    from tests.tpm_fixtures import swtpm, tpm, tpm_tools_env   # noqa: F401  (pytest finds them by name)

- `swtpm_template` (session): one manufactured TPM state (EK certificates from a
  local CA), made once per session with swtpm_setup; each test copies it.
- `swtpm`: a running swtpm on a private copy of that state (`.tcti`, `.data_dir`,
  the CA under `.data_dir / "ca"`); stopped (terminate, wait, kill) at teardown.
- `tpm`: a `controlplane.host.tpm.Tpm` on that swtpm (ECC AK); `rsa_tpm`: the same with an RSA AK.
- `tpm_tools_env`: os.environ plus TPM2TOOLS_TCTI for tpm2-tools on that swtpm;
  `tpm2_pcrread(env, pcr)`: what tpm2-tools reads there (an independent check).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from controlplane.host.swtpm import Swtpm, manufacture
from controlplane.host.tpm import Tpm
from tests.conftest import requires

needs_swtpm = requires(tool="swtpm_setup")


@pytest.fixture(scope="session")
def swtpm_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("swtpm_setup") is None or shutil.which("swtpm") is None:
        pytest.skip("swtpm/swtpm_setup not installed (make setup installs them)")
    base = tmp_path_factory.mktemp("swtpm-template")
    manufacture(base)
    return base


@pytest.fixture
def swtpm(swtpm_template: Path, tmp_path: Path) -> Iterator[Swtpm]:
    data_dir = tmp_path / "swtpm"
    shutil.copytree(swtpm_template, data_dir, symlinks=True)
    sw = Swtpm.start(data_dir)
    try:
        yield sw
    finally:
        sw.stop()


@pytest.fixture
def tpm(swtpm) -> Iterator[Tpm]:
    with Tpm(swtpm.tcti) as t:
        yield t


@pytest.fixture
def rsa_tpm(swtpm) -> Iterator[Tpm]:
    with Tpm(swtpm.tcti, ak_alg="rsa") as t:
        yield t


@pytest.fixture
def tpm_tools_env(swtpm) -> dict[str, str]:
    return dict(os.environ, TPM2TOOLS_TCTI=swtpm.tcti)


def tpm2_pcrread(env: dict[str, str], pcr: int) -> bytes:
    """PCR `pcr` of the sha256 bank as `tpm2_pcrread` reports it on the TPM that env's TPM2TOOLS_TCTI names."""
    out = subprocess.run(["tpm2_pcrread", f"sha256:{pcr}"], env=env, capture_output=True, text=True, check=True,
                         timeout=60).stdout
    found = re.search(rf"\b{pcr}\s*:\s*0x([0-9A-Fa-f]{{64}})", out)
    assert found, out
    return bytes.fromhex(found.group(1))
