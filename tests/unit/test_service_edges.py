"""The attestation service's rough edges a new user hit (issue 28 §1), over real HTTPS on a real swtpm."""
from __future__ import annotations

import re
import socket
from pathlib import Path

import httpx
import pytest

from controlplane.cli.main import main
from controlplane.cli.serve import running_service
from controlplane.core import imalog
from controlplane.host import mlog
from controlplane.host.tpm import Tpm
from tests.attest_fixtures import running_host
from tests.conftest import requires
from tests.tpm_fixtures import swtpm, swtpm_template  # noqa: F401

pytestmark = requires(tool="swtpm")

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|https?://(?!127\.0\.0\.1)""", re.I)


def tls_key_entries(data_dir: Path) -> int:
    return imalog.to_ascii(mlog.read_log(data_dir / "measurements.log")).count("tls-key")


def test_serve_that_cannot_bind_records_no_tls_key(swtpm, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    with running_service(data, device=swtpm.tcti, port=0):     # control: a service that listens records its key
        pass
    assert tls_key_entries(data) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--data-dir", str(data), "--device", swtpm.tcti, "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err == f"cwlite: error: attestation service: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert tls_key_entries(data) == 1                           # nothing recorded for the service that never ran


def test_unknown_query_parameters_and_no_external_assets(swtpm, tmp_path: Path) -> None:
    (tmp_path / "host").mkdir()
    with Tpm(swtpm.tcti) as tpm, running_host(tmp_path / "host", tpm=tpm) as h, \
            httpx.Client(base_url=h.url, verify=False) as c:
        r = c.get("/v1/log", params={"start": 99})
        assert r.status_code == 422
        assert r.json() == {"error": "start: unknown query parameter (this endpoint takes: from, limit)"}
        assert c.get("/v1/log", params={"from": 1}).json()["start"] == 1
        assert c.get("/v1/health", params={"verbose": 1}).status_code == 422
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert c.get(path).status_code == 404, path
        for path in ("/openapi.json", "/v1/health", "/v1/log", "/v1/policy", "/v1/enrol", "/docs", "/redoc", "/"):
            assert not EXTERNAL.search(c.get(path).text), path
