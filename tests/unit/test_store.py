"""The attestation store on SQLite and on a real PostgreSQL server."""
from __future__ import annotations

import pytest

from controlplane.core.errors import StoreError
from controlplane.verifier.store import Host, Store
from tests.pg_fixtures import new_database, postgres_url  # noqa: F401 - fixture

_N = 0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    global _N
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'attest.db'}"
    else:
        # one database per test on the shared server, so tests never see each other's rows
        base = request.getfixturevalue("postgres_url")
        _N += 1
        name = f"t{_N}_{abs(hash(request.node.name)) % 10**8}"
        url = new_database(base, name)
    with Store.open(url) as s:
        yield s


def _host(name="build1", ek=b"ek-1"):
    return Host(name=name, url="https://127.0.0.1:8443", ek_public=ek, ek_cert=b"\x30\x82cert",
                ak_public=b"ak-1", pcr=10, interval_s=5.0)


def test_enrol_and_read_back(store):
    store.enrol(_host())
    h = store.host("build1")
    assert (h.ek_public, h.ek_cert, h.ak_public, h.pcr, h.interval_s) == (b"ek-1", b"\x30\x82cert", b"ak-1", 10, 5.0)
    assert h.pcr_value is None and h.log_offset == 0
    assert [x.name for x in store.hosts()] == ["build1"]


def test_reenrol_with_another_ek_is_refused(store):
    store.enrol(_host())
    store.enrol(_host())  # same EK: idempotent
    with pytest.raises(StoreError, match="different EK"):
        store.enrol(_host(ek=b"ek-2"))
    assert store.host("build1").ek_public == b"ek-1"


def test_unknown_host(store):
    with pytest.raises(StoreError, match="'nope' is not enrolled"):
        store.host("nope")
    with pytest.raises(StoreError):
        store.record("nope", verdict="trusted")


def test_verdict_proof_and_state_in_one_transaction(store):
    store.enrol(_host())
    v = store.record("build1", verdict="trusted", log_start=0, log_end=7, findings=[{"entry": 3}],
                     proof_document='{"a":1}', proof_digest="ab" * 32,
                     state={"pcr_value": b"\x11" * 32, "log_offset": 7, "boot_aggregate": b"\x22" * 32})
    assert v.proof_id is not None and store.proof(v.proof_id) == '{"a":1}'
    h = store.host("build1")
    assert (h.pcr_value, h.log_offset, h.boot_aggregate) == (b"\x11" * 32, 7, b"\x22" * 32)
    store.record("build1", verdict="untrusted", reason="violation", log_start=7, log_end=9)
    assert [x.verdict for x in store.verdicts("build1")] == ["untrusted", "trusted"]
    assert store.verdicts("build1")[1].findings == [{"entry": 3}]


def test_bad_state_field_rolls_back_everything(store):
    store.enrol(_host())
    with pytest.raises(StoreError, match="'url' cannot be recorded"):
        store.record("build1", verdict="trusted", proof_document="{}", state={"log_offset": 5, "url": "x"})
    assert store.verdicts("build1") == [] and store.host("build1").log_offset == 0


def test_remove_cascades(store):
    store.enrol(_host())
    store.record("build1", verdict="trusted", proof_document="{}")
    store.remove("build1")
    assert store.hosts() == []


def test_unreachable_url_is_one_line(tmp_path):
    with pytest.raises(StoreError, match="cannot open the attestation store") as exc:
        Store(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    assert "\n" not in str(exc.value)
