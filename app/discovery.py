"""Consul: where an engine answers, and whether its health check passes.

Nomad registers each engine's service (named after its job) with an HTTP check on /health; this
module only reads Consul's health API. Calls are synchronous (py-consul); the Nomad driver runs
them on its own thread pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import consul
import requests

from app.config import Settings
from app.drivers.base import SchedulerUnavailable

Health = Literal["passing", "critical", "missing"]


@dataclass(frozen=True)
class Instance:
    url: str
    status: Health


class Discovery:
    def __init__(self, settings: Settings):
        addr = urlparse(settings.consul_addr)
        default_port = 443 if addr.scheme == "https" else 8500
        self.consul = consul.Consul(host=addr.hostname or "127.0.0.1", port=addr.port or default_port,
                                    scheme=addr.scheme or "http", token=settings.consul_token)

    def watch(self, service: str, index: int, wait_s: float) -> tuple[int, Instance | None]:
        """A blocking query: returns once the service's health changes after `index`, or after
        `wait_s`. The instance is the first one whose checks all pass, else the first one."""
        wait = f"{max(1, int(wait_s * 1000))}ms"
        new_index, entries = _call(lambda: self.consul.health.service(service, index=index or None,
                                                                      wait=wait))
        return int(new_index or 0), _pick(entries)

    def health(self, service: str) -> Health:
        _, entries = _call(lambda: self.consul.health.service(service))
        instance = _pick(entries)
        return instance.status if instance else "missing"

    def health_by_service(self) -> dict[str, Health]:
        """Every service's health from one call: passing when all its checks pass."""
        _, checks = _call(lambda: self.consul.health.state("any"))
        return by_service(checks)

    def ping(self) -> None:
        if not _call(self.consul.status.leader):
            raise SchedulerUnavailable("Consul has no leader")


def by_service(checks: list[dict[str, Any]] | None) -> dict[str, Health]:
    """Consul checks (/v1/health/state/any) -> each service's health."""
    health: dict[str, Health] = {}
    for check in checks or []:
        name = check.get("ServiceName")
        if name:  # node checks have none
            ok = check.get("Status") == "passing" and health.get(name, "passing") == "passing"
            health[name] = "passing" if ok else "critical"
    return health


def _pick(entries: list[dict[str, Any]] | None) -> Instance | None:
    instances = [_instance(e) for e in entries or []]
    passing = [i for i in instances if i.status == "passing"]
    chosen = passing or instances
    return chosen[0] if chosen else None


def _instance(entry: dict[str, Any]) -> Instance:
    service, node = entry.get("Service") or {}, entry.get("Node") or {}
    # A service registered without an address answers on its node's address.
    host = service.get("Address") or node.get("Address") or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    checks = entry.get("Checks") or []
    ok = bool(checks) and all(c.get("Status") == "passing" for c in checks)
    return Instance(f"http://{host}:{service.get('Port')}", "passing" if ok else "critical")


def _call(fn: Any) -> Any:
    try:
        return fn()
    except (requests.RequestException, consul.ConsulException) as exc:
        raise SchedulerUnavailable(f"Consul is unreachable: {type(exc).__name__}") from None
