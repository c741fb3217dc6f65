"""How a Nomad engine is doing, for the reconciler's scheduled health check, at the least cost.

Issue 11: at rest, a fleet of 1,000 engines is checked 100 times a second (every
ORCH_HEALTH_INTERVAL_S each). Before, each reconciler pass took a snapshot of the whole fleet
(`GET /v1/allocations` and Consul's `/v1/health/state/any`: two calls, and parsing every
allocation and every check): 6.2% of a core at rest with 1,000 engines, against 1.45-1.5%
this way, 1.35% once a replica's fixed cost was cut (`BENCH_ONLY=nomad make bench`). Now, in this order:
- an end Nomad's event stream reported: dead (or node_lost), with no call;
- while the event follower is live (Nomad's stream connected, Consul's blocking query
  current; app/drivers/_nomad_events.py) and watches the engine's allocation, what it knows:
  the allocation is live unless the stream said otherwise, and Consul's last answer says
  whether the check passes. Passing: healthy, with no call;
- otherwise (events off, a stream that dropped, an engine not watched yet): the fleet
  snapshot, at most one per reconciler pass;
- bad news from either is confirmed by direct reads of the allocation and the service's
  health, since it may predate a change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from app.discovery import Discovery
from app.drivers._nomad_api import NomadAPI
from app.drivers._nomad_events import FleetEvents
from app.drivers.base import Probe

LIVE = ("pending", "running")
IO = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class _Snapshot:
    taken: float
    allocs: dict[str, str]  # allocation ID -> ClientStatus
    health: dict[str, str]  # service -> "passing" | "critical"


class Prober:
    def __init__(self, api: NomadAPI, consul: Discovery, events: FleetEvents, io: IO,
                 snapshot_ttl: float):
        self.api, self.consul, self.events, self._io = api, consul, events, io
        self._ttl = snapshot_ttl
        self._lock = asyncio.Lock()
        self._last: _Snapshot | None = None
        self.from_events = self.from_snapshot = 0  # checks answered each way (tests read them)

    async def probe(self, name: str, alloc_id: str) -> Probe:
        ended = self.events.status(alloc_id)   # Nomad told us: no need to ask
        if ended is not None:
            return "node_lost" if ended == "lost" else "dead"
        known = self.events.health_of(name, alloc_id)
        if known is not None:
            self.from_events += 1
            return "healthy" if known == "passing" else await self._confirm(name, alloc_id)
        self.from_snapshot += 1
        snapshot = await self._snapshot()
        if snapshot.allocs.get(alloc_id) not in LIVE:
            return await self._confirm(name, alloc_id)
        if snapshot.health.get(name) == "passing":
            return "healthy"
        return await self._health(name)

    def stale(self, name: str) -> None:
        self._last = None   # the fleet snapshot predates this news

    async def _confirm(self, name: str, alloc_id: str) -> Probe:
        alloc = await self._io(self.api.allocation, alloc_id)
        if alloc is not None and alloc.get("ClientStatus") == "lost":
            return "node_lost"
        if alloc is None or alloc.get("ClientStatus") not in LIVE:
            return "dead"
        return await self._health(name)

    async def _health(self, name: str) -> Probe:
        health = await self._io(self.consul.health, name)
        return "healthy" if health == "passing" else "unhealthy"

    async def _snapshot(self) -> _Snapshot:
        async with self._lock:
            if self._last is None or time.monotonic() - self._last.taken > self._ttl:
                allocs, health = await asyncio.gather(self._io(self.api.all_allocations),
                                                      self._io(self.consul.health_by_service))
                self._last = _Snapshot(time.monotonic(),
                                       {a["ID"]: a.get("ClientStatus") for a in allocs}, health)
            return self._last
