"""Benchmarks record their figures: the `bench_record` fixture (tests/bench/record.py writes them).

    def test_something(bench_record) -> None:
        ...
        bench_record("quote round trip p50", p50_ms, baseline=in_process_p50_ms, unit="ms")
        bench_record("log rate vs raw extend", log_rate, baseline=raw_rate, unit="entries/s",
                     target=0.8, higher_is_better=True, samples=per_round_rates)

Signature: bench_record(name, value, baseline=None, unit="", target=None, higher_is_better=False,
*, ratio=None, samples=None, note=""). The ratio is value / baseline (or the `ratio` given); the
target is judged on the ratio when there is a baseline, else on the value. Each call appends one
JSON line to bench-results/results.jsonl; `make bench` then runs `python -m tests.bench.report`,
which writes bench-results/REPORT.md (one table: figure, baseline, ratio, target, met?) and the
PNG plots beside it. Figures are recorded, never asserted on: speed is reported, not a test verdict.
"""
from __future__ import annotations

import functools

import pytest

from tests.bench.record import record


@pytest.fixture
def bench_record(request: pytest.FixtureRequest):
    """`record` with the test's name filled in."""
    return functools.partial(record, test=request.node.nodeid)
