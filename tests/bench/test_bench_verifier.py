"""Verifier speed (`make bench`): replay + check of a 100,000-entry ima-ng log, incremental rounds,
and the quote round trip over loopback TLS with a real swtpm.

Figures (medians of alternating rounds, baseline measured in the same run):
- full check: what the verifier does with a fetched /v1/log text: imalog.parse_ascii (template
  hash checked per entry), incremental replay to the quoted value, every entry judged against
  the policy and the measurement DB; entries/s and the ratio to a bare hashlib replay loop
  over the same ASCII text (split the line, rebuild the ima-ng template data, SHA-256 it,
  extend): the limit for any replay of this format in Python. Target >= 0.5.
- incremental: 100 new entries checked from the last verified state; target < 5% of a full check.
- quote round trip: POST /v1/quote over HTTPS (TPM2_Quote on swtpm + verify_quote with the
  TLS key binding), p50/p99.
"""
from __future__ import annotations

import hashlib
import os
import statistics
import struct
import time
from pathlib import Path

from controlplane.core import imalog
from controlplane.core.imalog import replay_to
from controlplane.core.policy import load_policy
from controlplane.core.quote import verify_quote
from controlplane.core.wire import quote_qualifying_data
from controlplane.core.events import Event, EventKind
from controlplane.verifier.evidence import fetch_quote, parse_page
from controlplane.verifier import registrar
from controlplane.verifier.client import Channel
from controlplane.verifier.judge import Facts, Judge
from controlplane.verifier.store import Store
from prima.measuredb import MeasureDB
from tests.attest_fixtures import make_reference, running_host
from tests.conftest import requires

pytestmark = requires(tool="swtpm")
N = 100_000
NEW = 100
ROUNDS = 5
PCR = 10


def _log(ref, db_digest: bytes, policy_digest: bytes) -> list[imalog.LogEntry]:
    """A host's log: the start-up entries, then label transitions and trusted loads of DB files."""
    tools = list(ref.trusted.items())
    events = [Event(EventKind.BOOT_AGGREGATE, hashlib.sha256(b"boot").digest()),
              Event(EventKind.TLS_KEY, hashlib.sha256(b"tls").digest(), op="serve"),
              Event(EventKind.DAEMON_START, subject="prima/tracepoint"),
              Event(EventKind.POLICY_LOAD, policy_digest, subject="policy.toml"),
              Event(EventKind.DB_LOAD, db_digest, subject="trusted.db")]
    i = 0
    while len(events) < N + NEW:
        path, digest = tools[i % len(tools)]
        kind = EventKind.LABEL_TRANSITION if path == ref.entry else EventKind.TRUSTED_LOAD
        events.append(Event(kind, digest, "tp_build", "exec", path))
        i += 1
    return [imalog.LogEntry.new(n, PCR, e.digest, e.ima_name()) for n, e in enumerate(events)]


def _bare_replay(text: str) -> bytes:
    """The limit: per line split, rebuild the ima-ng template data, SHA-256 it, extend."""
    value, sha, pack = bytes(32), hashlib.sha256, struct.Struct("<I").pack
    for line in text.splitlines():
        _, _, _, dng, name = line.split(" ", 4)
        alg, _, dhex = dng.partition(":")
        d_ng = alg.encode() + b":\0" + bytes.fromhex(dhex)
        n_ng = name.encode() + b"\0"
        value = sha(value + sha(pack(len(d_ng)) + d_ng + pack(len(n_ng)) + n_ng).digest()).digest()
    return value


def _check(ref_open, text: str, start: int, start_value: bytes, target: bytes, facts: Facts) -> int:
    entries = parse_page(text, start)
    n = replay_to(entries, start_value, target, PCR)
    assert n == len(entries)
    judge = Judge(ref_open, facts)
    bad = [v for v in map(judge.judge, entries) if v.verdict == "untrusted"]
    assert not bad, bad[:3]
    return n


def test_replay_and_check_100k(tmp_path: Path, bench_record) -> None:
    ref = make_reference(tmp_path)
    with MeasureDB.open(ref.db_path) as db:
        db_digest = db.digest()
    entries = _log(ref, db_digest, load_policy(ref.policy_path).digest())
    full, new = entries[:N], entries[N:]
    full_text, new_text = imalog.to_ascii(full), imalog.to_ascii(new)
    prefixes = imalog.replay_prefixes(entries, PCR)
    mid, end = prefixes[N], prefixes[N + NEW]

    bare, checked, incremental, parse_only = [], [], [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        assert _bare_replay(full_text) == mid
        bare.append(time.perf_counter() - t0)
        r = ref.open()
        try:
            facts = Facts()
            t0 = time.perf_counter()
            _check(r, full_text, 0, bytes(32), mid, facts)
            checked.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _check(r, new_text, N, mid, end, facts)
            incremental.append(time.perf_counter() - t0)
        finally:
            r.db.close()
        t0 = time.perf_counter()
        assert _bare_replay(full_text) == mid
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        parse_page(full_text, 0)
        parse_only.append(time.perf_counter() - t0)

    p = statistics.median(parse_only)
    b, c, i = statistics.median(bare), statistics.median(checked), statistics.median(incremental)
    print(f"\nverifier: {N} entries: bare hashlib replay {N / b:,.0f} entries/s ({b * 1000:.0f} ms); "
          f"parse+replay+check {N / c:,.0f} entries/s ({c * 1000:.0f} ms); ratio {b / c:.2f} (target >= 0.5); "
          f"of which imalog.parse_ascii alone {p * 1000:.0f} ms (ratio bare/parse {b / p:.2f})")
    print(f"verifier: incremental {NEW} new entries {i * 1000:.2f} ms = {100 * i / c:.2f}% of a full check "
          f"(target < 5%)")
    bench_record("verifier: parse+replay+check of 100k entries vs bare hashlib replay", N / c, N / b, "entries/s",
                 target=0.5, higher_is_better=True, samples=[N / x for x in checked])
    bench_record("verifier: incremental 100 entries vs full 100k check", i, c, "s", target=0.05)


def test_quote_round_trip_over_loopback_tls(tmp_path: Path, bench_record) -> None:

    with running_host(tmp_path / "host") as h, Store(f"sqlite:///{tmp_path}/a.db") as store:
        host = registrar.enrol(h.url, "bench", store)
        times = []
        with Channel(h.url) as ch:
            for _ in range(300):
                t0 = time.perf_counter()
                fetch_quote(ch, host, os.urandom(32))
                times.append(time.perf_counter() - t0)
        # baseline, same TPM, same run: TPM2_Quote + verify_quote in-process, no HTTPS
        direct, pcrs = [], sorted({*range(10), 10})
        for _ in range(300):
            nonce = os.urandom(32)
            t0 = time.perf_counter()
            qd = quote_qualifying_data(nonce, h.state.tls.spki_sha256)
            q, _ = h.log.quote(qd, pcrs)
            verify_quote(host.ak_public, q, qd)
            direct.append(time.perf_counter() - t0)
        fresh = []
        for _ in range(30):                       # a new TLS connection per round, as `cwlite verify` does
            t0 = time.perf_counter()
            with Channel(h.url) as ch:
                fetch_quote(ch, host, os.urandom(32))
            fresh.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=100)
    qf = statistics.quantiles(fresh, n=100)
    qd_ = statistics.quantiles(direct, n=100)
    print(f"\nquote in-process (baseline: TPM2_Quote of PCRs 0-10 on swtpm + verify_quote): p50 {qd_[49] * 1000:.1f} ms, "
          f"p99 {qd_[98] * 1000:.1f} ms")
    print(f"quote round trip over loopback HTTPS (keep-alive): p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms "
          f"(p50 ratio to in-process {q[49] / qd_[49]:.2f}); with a new TLS connection per round: "
          f"p50 {qf[49] * 1000:.1f} ms, p99 {qf[98] * 1000:.1f} ms")
    bench_record("quote round trip over HTTPS (keep-alive), p50", q[49] * 1000, qd_[49] * 1000, "ms",
                 samples=[t * 1000 for t in times])
    bench_record("quote round trip over HTTPS (keep-alive), p99", q[98] * 1000, qd_[98] * 1000, "ms")
    bench_record("quote round trip, new TLS connection per round, p50", qf[49] * 1000, qd_[49] * 1000, "ms")
