"""schemathesis against the service's own OpenAPI schema, over real HTTPS on loopback: no 5xx."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
import urllib3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from controlplane.host.service import ServiceState, TlsIdentity, create_app
from tests.attest_fixtures import enforcement_started, make_reference, running_host
from tests.conftest import requires

pytestmark = [requires(tool="swtpm"), pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def live_host(tmp_path_factory):
    base = tmp_path_factory.mktemp("schema")
    ref = make_reference(base / "verifier")
    with running_host(base / "host", policy_path=ref.policy_path,
                      controller_key=Ed25519PrivateKey.generate().public_key(), db_digest=b"\x01" * 32) as h:
        enforcement_started(h, ref)
        yield h


def _schema():
    """The schema as the service serves it at /openapi.json (building it touches no TPM)."""
    return create_app(ServiceState(tpm=None, mlog=None, tls=TlsIdentity.fresh())).openapi()


schema = schemathesis.openapi.from_dict(_schema())


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, live_host):
    urllib3.disable_warnings()
    case.call_and_validate(base_url=live_host.url, verify=False, checks=[not_a_server_error], timeout=30)


def test_the_served_schema_is_the_one_tested(live_host):
    served = httpx.get(f"{live_host.url}/openapi.json", verify=False).json()
    assert served == _schema()
    assert {"/v1/quote", "/v1/log", "/v1/policy", "/v1/health", "/v1/enrol", "/v1/enrol/activate"} <= set(served["paths"])
