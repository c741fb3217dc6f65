"""Prometheus metrics. Counters and histograms are updated where things happen; the engine
counts by product and state are read from the registry when /metrics is scraped, so every
replica reports the same truth and nothing has to be kept in step."""

from __future__ import annotations

import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import metrics as _client_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from app import registry, states

REGISTRY = CollectorRegistry(auto_describe=True)

FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

OPERATION_SECONDS = Histogram("orch_operation_seconds",
                              "Lifecycle operations (provision, start, wake, restart, stop, ...)",
                              ["operation", "outcome"], buckets=SLOW, registry=REGISTRY)
BOOT_SECONDS = Histogram("orch_boot_seconds", "Engine launch to first passing health check",
                         buckets=SLOW, registry=REGISTRY)
TRANSITIONS = Counter("orch_transitions_total", "State transitions", ["event", "to"],
                      registry=REGISTRY)
FAILURES = Counter("orch_engine_failures_total", "Engines that became failed, by reason",
                   ["reason"], registry=REGISTRY)
REFUSALS = Counter("orch_refusals_total", "Admits and provisions refused by policy", ["reason"],
                   registry=REGISTRY)
DRIVER_SECONDS = Histogram("orch_driver_call_seconds", "Driver calls", ["driver", "call"],
                           buckets=FAST + SLOW[5:], registry=REGISTRY)
DRIVER_ERRORS = Counter("orch_driver_errors_total", "Driver calls that raised", ["driver", "call", "code"],
                        registry=REGISTRY)
EDGE_REFUSALS = Counter("orch_edge_refusals_total",
                       "Requests answered by the HTTP edge before any route ran (408, 431, "
                       "400 malformed, 505, 503 SERVER_BUSY), by error code",
                       ["code"], registry=REGISTRY)
EDGE_CLOSES = Counter("orch_edge_closes_total",
                      "Connections the HTTP edge closed with nothing to answer: no whole head "
                      "in time (head_timeout), no whole body after an early answer "
                      "(body_timeout), or closed to make room past the limit (evicted)",
                      ["why"], registry=REGISTRY)
POOL_CLAIMS = Counter("orch_pool_claims_total", "New users served from the warm pool",
                      ["product"], registry=REGISTRY)
POOL_MISSES = Counter("orch_pool_misses_total",
                      "Cold provisions of new users while the product had a warm pool",
                      ["product"], registry=REGISTRY)
POOL_REFILL_SECONDS = Histogram("orch_pool_refill_seconds",
                                "A pooled engine: refill start to ready", buckets=SLOW,
                                registry=REGISTRY)


class PerRequest(Collector):
    """orch_requests_total and orch_admit_seconds, counted in plain ints and floats and turned
    into metric families only when /metrics is scraped.

    They are updated on every request, where prometheus_client's children (a lock and a method
    call per counter, a loop over the buckets per observation) cost several times this. The
    exposition is the same as those children's: same names, labels, buckets, _created.
    Only the event loop thread may call count() or collect() (/metrics is served there): `+=`
    on a list item is not atomic across threads, and nothing else needs to."""

    BUCKETS = tuple(sorted(set(FAST + SLOW[5:])))  # FAST ends where SLOW[5:] starts: one 1.0

    def __init__(self) -> None:
        # (route, method, status) -> [count, created]
        self.requests: dict[tuple[str, str, int], list[float]] = {}
        # outcome -> [count per bucket (+Inf last, not cumulative), sum, created]
        self.admits: dict[str, list] = {}  # type: ignore[type-arg]
        # Whatever holds requests answered but not yet counted (the access logs, which count
        # in batches): settled before every scrape, so a scrape misses no answered request.
        self.sources: weakref.WeakSet[Any] = weakref.WeakSet()

    def settle(self) -> None:
        for source in list(self.sources):
            source.settle()

    def count(self, route: str, method: str, status: int) -> None:
        key = (route, method, status)
        entry = self.requests.get(key)
        if entry is None:
            entry = self.requests[key] = [0, time.time()]
        entry[0] += 1

    def observe_admit(self, outcome: str, seconds: float) -> None:
        entry = self.admits.get(outcome)
        if entry is None:
            entry = self.admits[outcome] = [[0] * (len(self.BUCKETS) + 1), 0.0, time.time()]
        entry[0][bisect_left(self.BUCKETS, seconds)] += 1  # the first bound >= seconds
        entry[1] += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        self.settle()
        requests = CounterMetricFamily("orch_requests", "HTTP requests by route, method and status",
                                       labels=["route", "method", "status"])
        # Like the library's own children: no _created when PROMETHEUS_DISABLE_CREATED_SERIES.
        with_created = getattr(_client_metrics, "_use_created", True)
        for (route, method, status), (count, created) in list(self.requests.items()):
            requests.add_metric([route, method, str(status)], count,
                                created=created if with_created else None)
        yield requests
        admits = HistogramMetricFamily("orch_admit_seconds", "Time to answer /admit",
                                       labels=["outcome"])
        bounds = [floatToGoString(b) for b in self.BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]
        for outcome, (counts, total, created) in list(self.admits.items()):
            cumulative, running = [], 0
            for bound, n in zip(bounds, counts):
                running += n
                cumulative.append((bound, running))
            admits.add_metric([outcome], cumulative, total)
            if with_created:
                admits.samples.append(Sample("orch_admit_seconds_created", {"outcome": outcome},
                                             created, None, None))
        yield admits


PER_REQUEST = PerRequest()
REGISTRY.register(PER_REQUEST)


class EngineStates(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("orch_engines", "Engines by product and state",
                                   labels=["product", "state"])
        try:
            rows = registry.engine_counts()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the db is busy
            rows = []
        for product, state, count in rows:
            family.add_metric([product, state], count)
        yield family
        warm = GaugeMetricFamily("orch_pool_ready", "Warm pool engines ready to be claimed",
                                 labels=["product"])
        try:
            names = {p.id: p.name for p in registry.pool.pool_products()}
            counts = registry.pool.warm_counts()
        except Exception:  # noqa: BLE001 - as above
            names, counts = {}, {}
        for product_id, name in names.items():
            warm.add_metric([name], counts.get(product_id, 0))
        yield warm


REGISTRY.register(EngineStates())


def count_transition(change: registry.Transition) -> None:
    """Subscribed to the registry's transitions at start-up (app.api.app)."""
    TRANSITIONS.labels(change.event, change.to_status or "gone").inc()
    if change.to_status == states.FAILED and change.from_status != states.FAILED:
        FAILURES.labels(change.reason or "unknown").inc()



def exposition() -> bytes:
    PER_REQUEST.settle()  # first: the refusals counter is collected before PER_REQUEST
    return generate_latest(REGISTRY)
