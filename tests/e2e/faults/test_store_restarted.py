"""Fault: the verifier's PostgreSQL server restarts during `verify --watch` (issue 28 §5).

The watch runs against a real host (swtpm + log + HTTPS service) with a store on a real
PostgreSQL server (tests/pg_fixtures.py). Between rounds the server is restarted (every pooled
connection dropped); then it stops in the middle of a round (while the host answers the quote).
Then:
- the watch never dies: a round whose verdict cannot be stored is yielded as a StoreError;
- nothing half-stored: that round left no verdict and did not advance the host's verified state;
- nothing lost: the next round replays from the last verified offset and judges the entries the
  failed round had seen (the violation among them) again, and its proof names them.
"""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from controlplane.core.errors import StoreError
from controlplane.core.events import EventKind
from controlplane.core.keys import load_signing_key
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.store import Store
from tests.attest_fixtures import enforcement_started, reference, running_host  # noqa: F401
from tests.conftest import requires
from tests.e2e.serve_process import HOST
from tests.pg_fixtures import new_database, postgres_server  # noqa: F401
from tests.tpm_fixtures import swtpm, swtpm_template, tpm  # noqa: F401

pytestmark = [requires(tool="swtpm"), pytest.mark.timeout(600)]


def test_a_restarted_postgres_fails_one_round_and_loses_nothing(tmp_path, tpm, reference, postgres_server) -> None:
    url = new_database(postgres_server.url, "fault_watch")
    key = load_signing_key(tmp_path / "verifier.key", create=True)
    ref = reference.open()
    outcomes: list = []
    (tmp_path / "host").mkdir()
    with running_host(tmp_path / "host", tpm=tpm) as host, Store(url) as store, contextlib.closing(ref.db):
        enforcement_started(host, reference)
        registrar.enrol(host.url, HOST, store, interval_s=0.5)
        loop = asyncio.new_event_loop()
        rounds = verifier.watch(store, ref, key, hosts=[HOST])
        next_round = lambda: loop.run_until_complete(rounds.__anext__())[1]   # between rounds the watch waits

        outcomes.append(next_round())                             # 1: trusted
        postgres_server.restart()                                 # every pooled connection is now dead
        outcomes.append(next_round())                             # 2: trusted again (pre-ping reconnects)
        before = store.host(HOST)

        host.record(EventKind.VIOLATION, label="tp_build", op="exec", subject="/tmp/evil")
        alive = host.state.on_quote

        def quote_then_database_down(nonce: bytes) -> None:      # mid-round: after the host was read
            alive(nonce)
            host.state.on_quote = alive
            postgres_server.stop()

        host.state.on_quote = quote_then_database_down
        try:
            outcomes.append(next_round())                         # 3: judged, but cannot be stored
        finally:
            postgres_server.start()
        outcomes.append(next_round())                             # 4: the same entries judged again
        loop.run_until_complete(rounds.aclose())
        loop.close()
        after = store.host(HOST)
        verdicts = [v.verdict for v in store.verdicts(HOST)]

    first, second, failed, fourth = outcomes
    assert first.verdict == "trusted" and second.verdict == "trusted", (first.reasons, second.reasons)
    assert isinstance(failed, StoreError) and "record a verdict" in str(failed)
    assert verdicts == ["untrusted", "trusted", "trusted"]        # nothing of round 3 was stored
    assert before.log_offset == second.log_end and fourth.log_start == before.log_offset
    assert fourth.verdict == "untrusted" and after.log_offset == fourth.log_end
    assert [(e["kind"], e["subject"]) for e in fourth.document["entries"]] == [("violation", "/tmp/evil")]
