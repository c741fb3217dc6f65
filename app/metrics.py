"""Prometheus metrics. Counters and histograms are updated where things happen; the engine
counts by product and state are read from the registry when /metrics is scraped, so every
replica reports the same truth and nothing has to be kept in step."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

REQUESTS = Counter("orch_requests_total", "HTTP requests by route, method and status",
                   ["route", "method", "status"], registry=REGISTRY)
ADMIT_SECONDS = Histogram("orch_admit_seconds", "Time to answer /admit", ["outcome"],
                          buckets=FAST + SLOW[5:], registry=REGISTRY)
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


# Children by label values, so the hot path skips prometheus_client's label lookup.
_request_children: dict[tuple[str, str, int], Any] = {}
_admit_children: dict[str, Any] = {}


def requests_counter(route: str, method: str, status: int) -> Any:
    key = (route, method, status)
    child = _request_children.get(key)
    if child is None:
        child = _request_children[key] = REQUESTS.labels(route, method, str(status))
    return child


def admit_histogram(outcome: str) -> Any:
    child = _admit_children.get(outcome)
    if child is None:
        child = _admit_children[outcome] = ADMIT_SECONDS.labels(outcome)
    return child


class EngineStates(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        from app import registry

        family = GaugeMetricFamily("orch_engines", "Engines by product and state",
                                   labels=["product", "state"])
        try:
            rows = registry.engine_counts()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the db is busy
            rows = []
        for product, state, count in rows:
            family.add_metric([product, state], count)
        yield family


REGISTRY.register(EngineStates())


def exposition() -> bytes:
    return generate_latest(REGISTRY)
