"""Prometheus metrics of the attestation service (`GET /metrics`), in a registry of its own.

What an operator watches on a Build VM: the events enforcement recorded (by
kind), violations (by label), lost-events entries, the measurement log's length
and the PCR extends behind it, and how long quotes take. Counts are of this
process's lifetime; the log length and the extends are read at each scrape.
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from controlplane.core.events import Event, EventKind

QUOTE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Extends(Collector):
    """The log's PCR extends, read from the log at scrape time (its commit thread counts them)."""

    def __init__(self, mlog: Any) -> None:
        self.mlog = mlog

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("cwlite_pcr_extends", "PCR extends made for the measurement log by this service",
                                  value=self.mlog.extends)


class ServiceMetrics:
    """The service's metrics; `record` makes it an EventSink beside the measurement log."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, mlog: Any) -> None:
        """`mlog` follows controlplane.host.mlog.MeasurementLog (len() and .extends)."""
        self.registry = r = CollectorRegistry()
        self.events = Counter("cwlite_events", "Enforcement events recorded in the measurement log", ["kind"], registry=r)
        self.violations = Counter("cwlite_violations", "Violations recorded (killed, denied, or allowed in audit)",
                                  ["label"], registry=r)
        self.lost = Counter("cwlite_lost_events", "lost-events entries: ring buffer overruns and map failures", registry=r)
        self.quote_latency = Histogram("cwlite_quote_seconds", "Time to answer POST /v1/quote (engine liveness "
                                       "entry, log flush and TPM quote)", buckets=QUOTE_BUCKETS, registry=r)
        Gauge("cwlite_log_entries", "Entries in the measurement log (committed: the PCR holds them)",
              registry=r).set_function(lambda: len(mlog))
        r.register(_Extends(mlog))

    def record(self, event: Event) -> None:
        """Count one event (EventSink)."""
        self.events.labels(event.kind.value).inc()
        if event.kind is EventKind.VIOLATION:
            self.violations.labels(event.label or "-").inc()
        elif event.kind is EventKind.LOST_EVENTS:
            self.lost.inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
