"""Issue 11: what Nomad and Consul push, turned into "this engine ended or changed".

The Nomad driver's engines are watched, not polled:
- Nomad's event stream (`GET /v1/event/stream`, topics Allocation, Job and Node; ndjson, one
  frame `{"Index": N, "Events": [...]}` per change, `{}` heartbeats): an allocation of a watched
  engine that turns failed, complete or lost, its job deregistered behind our back, or its node
  going down, calls the listeners with the engine's name. A stream that drops is resumed at the
  index after the last frame seen, with backoff; Nomad starts a subscription at that index or
  the next one still in its buffer (nomad/stream/event_buffer.go StartAtClosest).
- Consul's health (`/v1/health/state/any` as a blocking query, `index` and `wait`): a watched
  engine whose check stops passing calls the listeners too. The index only moves forward: one
  that goes backwards (a Consul restart) starts over from 0, as Consul's docs require.
Neither is trusted alone: a frame that falls out of Nomad's buffer while we are away is never
seen. The reconciler's full resync (ORCH_RESYNC_S) watches every running engine again; a watch
of an engine already watched asks for an audit, one fleet-wide allocation listing that reports
every watched engine whose allocation is no longer live.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from app.config import Settings
from app.discovery import Health, by_service

log = logging.getLogger("orch.nomad.events")

Listener = Callable[[str], None]
TERMINAL = ("complete", "failed", "lost")
LIVE = ("pending", "running")
TOPICS = ("Allocation", "Job", "Node")
STALL_S = 75.0          # no byte for 2.5 of Nomad's 30 s heartbeats (nomad/event_endpoint.go): dead
CONSUL_WAIT_S = 30.0    # each blocking query's `wait`
CONSUL_MIN_GAP_S = 0.2  # Consul's advice: rate-limit a blocking loop whose index moves often
BACKOFF_S = (0.1, 5.0)  # first and longest pause before resuming a dropped stream or query
ENDED_KEPT = 4096       # terminal allocations remembered for an engine watched after its end


class FleetEvents:
    def __init__(self, settings: Settings, list_allocs: Callable[[], Awaitable[list[dict[str, Any]]]]):
        self.settings = settings
        self._list_allocs = list_allocs
        self.listeners: list[Listener] = []
        self.alloc_of: dict[str, str] = {}      # watched engine -> its allocation
        self.name_of: dict[str, str] = {}       # the reverse
        self.node_of: dict[str, str] = {}       # watched allocation -> its node, when known
        self.ended: OrderedDict[str, str] = OrderedDict()  # allocation -> terminal ClientStatus
        self.health: dict[str, Health] | None = None  # Consul's view, while the query is live
        self._stream_up = False   # the event stream is connected
        self._gap = False         # ... after a drop whose missed ends no audit has looked for yet
        self.index = 0            # the last Nomad index seen in a frame
        self.frames = self.drops = self.audits = 0
        self._audit_wanted = False
        self._progress: set[str] = set()  # followers that got an answer: backoff starts over
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None

    # ---- what the driver calls ------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def watch(self, name: str, alloc_id: str, node_id: str | None, resync: bool = True) -> None:
        """Watch an engine's allocation; the reconciler's resync watches each running engine
        again, and that asks for an audit."""
        self._start()
        if self.alloc_of.get(name) == alloc_id:
            if resync:
                self._want_audit()
            return
        self.forget(name)
        self.alloc_of[name], self.name_of[alloc_id] = alloc_id, name
        if node_id:
            self.node_of[alloc_id] = node_id
        if alloc_id in self.ended:   # it ended before we watched it
            asyncio.get_running_loop().call_soon(self._ended, alloc_id)

    def forget(self, name: str) -> None:
        """An end we cause (stop, destroy) is no news."""
        alloc_id = self.alloc_of.pop(name, None)
        if alloc_id is not None:
            self.name_of.pop(alloc_id, None)
            self.node_of.pop(alloc_id, None)

    def status(self, alloc_id: str) -> str | None:
        """The terminal ClientStatus an event reported for this allocation, if any."""
        return self.ended.get(alloc_id)

    @property
    def nomad_live(self) -> bool:
        """Every end of a watched allocation reaches us (or was found by the audit)."""
        return self._stream_up and not self._gap

    def health_of(self, name: str, alloc_id: str) -> Health | None:
        """Consul's last word on a watched engine whose allocation Nomad has not reported
        ended, while both followers are live (so silence means nothing changed); None when
        they cannot say: not live, not watched, or Consul has not listed it yet."""
        if not self.nomad_live or self.health is None or self.alloc_of.get(name) != alloc_id:
            return None
        return self.health.get(name)

    async def close(self) -> None:
        self._stream_up = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ---- following ------------------------------------------------------------------------

    def _start(self) -> None:
        if self._tasks:
            return
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=STALL_S), trust_env=False)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._forever(self._follow_nomad, "nomad")),
                       loop.create_task(self._forever(self._follow_consul, "consul"))]

    async def _forever(self, follow: Callable[[], Awaitable[None]], what: str) -> None:
        pause = BACKOFF_S[0]
        while True:
            self._progress.discard(what)
            try:
                await follow()
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("%s dropped: %s", what, exc)
            except Exception:  # a bug here must not end the watching for good
                log.exception("following %s failed", what)
            if what == "nomad":
                self._stream_up = False
                self.drops += 1
            else:
                self.health = None   # no longer current: probes ask Consul themselves
            if what in self._progress:
                pause = BACKOFF_S[0]
            await asyncio.sleep(pause)
            pause = min(pause * 2, BACKOFF_S[1])

    async def _follow_nomad(self) -> None:
        """One subscription, until it drops."""
        assert self._http is not None
        params: list[tuple[str, str | int | float | bool | None]] = [("topic", t) for t in TOPICS]
        params.append(("index", str(self.index + 1 if self.index else 0)))
        params += [(k, v) for k, v in (("namespace", self.settings.nomad_namespace),
                                       ("region", self.settings.nomad_region)) if v]
        headers = {"X-Nomad-Token": self.settings.nomad_token} if self.settings.nomad_token else {}
        async with self._http.stream("GET", self.settings.nomad_addr + "/v1/event/stream",
                                     params=params, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")[:200]
                log.warning("Nomad refused the event stream (%s): %s", response.status_code, body)
                return
            if self._audit_after_gap():
                self._gap = True
                self._want_audit()   # we were away: what changed meanwhile may be gone
            self._stream_up = True
            async for line in response.aiter_lines():
                if line.strip() not in ("", "{}"):   # a heartbeat is no progress: a stream
                    self._progress.add("nomad")      # cut after each one still backs off
                    self._frame(json.loads(line))

    def _audit_after_gap(self) -> bool:
        return self.drops > 0 and bool(self.alloc_of)

    def _frame(self, frame: dict[str, Any]) -> None:
        if not frame:
            return   # a heartbeat
        self.frames += 1
        self.index = max(self.index, int(frame["Index"]))
        for event in frame.get("Events") or []:
            payload = event.get("Payload") or {}
            if event.get("Topic") == "Allocation":
                self._allocation(payload.get("Allocation") or {})
            elif event.get("Topic") == "Node":
                node = payload.get("Node") or {}
                if node.get("Status") == "down":
                    for alloc_id in [a for a, n in self.node_of.items() if n == node.get("ID")]:
                        self._fire(self.name_of.get(alloc_id))
            elif event.get("Topic") == "Job" and event.get("Type") == "JobDeregistered":
                self._fire(event.get("Key") if event.get("Key") in self.alloc_of else None)

    def _allocation(self, alloc: dict[str, Any]) -> None:
        alloc_id, status = alloc.get("ID"), alloc.get("ClientStatus")
        if not alloc_id:
            return
        if alloc_id in self.name_of and alloc.get("NodeID"):
            self.node_of[alloc_id] = alloc["NodeID"]
        if status in TERMINAL:
            self.ended[alloc_id] = status
            self.ended.move_to_end(alloc_id)
            while len(self.ended) > ENDED_KEPT:
                self.ended.popitem(last=False)
            self._ended(alloc_id)

    def _ended(self, alloc_id: str) -> None:
        name = self.name_of.get(alloc_id)
        if name is not None:
            self.forget(name)   # told once; a new allocation is watched anew
            self._fire(name)

    async def _follow_consul(self) -> None:
        """Blocking queries on every check, until one fails."""
        assert self._http is not None
        headers = {"X-Consul-Token": self.settings.consul_token} if self.settings.consul_token else {}
        index = 0
        while True:
            params = {"wait": f"{int(CONSUL_WAIT_S)}s", **({"index": str(index)} if index else {})}
            response = await self._http.get(self.settings.consul_addr + "/v1/health/state/any",
                                            params=params, headers=headers,
                                            timeout=httpx.Timeout(10.0, read=CONSUL_WAIT_S * 1.5))
            response.raise_for_status()
            new_index = int(response.headers.get("X-Consul-Index") or 0)
            # Consul's rules: an index that goes backwards starts over (a read that does not
            # block), and one below 1 is taken as 1, so a bad answer cannot become a busy loop.
            index = 0 if new_index < index else max(new_index, 1)
            health, before = by_service(response.json()), self.health
            self.health = health
            self._progress.add("consul")
            if before is not None:
                for name, now in health.items():
                    if now != "passing" and before.get(name) == "passing" and name in self.alloc_of:
                        self._fire(name)
            await asyncio.sleep(CONSUL_MIN_GAP_S)

    # ---- the safety net -------------------------------------------------------------------

    def _want_audit(self) -> None:
        if not self._audit_wanted:
            self._audit_wanted = True
            task = asyncio.get_running_loop().create_task(self._audit())
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    async def _audit(self) -> None:
        """One listing of every allocation: each watched engine whose allocation is not live
        (an event we missed) is reported."""
        await asyncio.sleep(0)   # after the rest of the resync's watches
        self._audit_wanted = False
        # A listing closes a gap only if it was asked for on the stream as it is now.
        epoch = self.drops if self._stream_up else -1
        try:
            allocs = {a["ID"]: a.get("ClientStatus") for a in await self._list_allocs()}
        except Exception as exc:  # noqa: BLE001 - the next resync tries again
            log.debug("audit skipped: %s", exc)
            return
        self.audits += 1
        if epoch == self.drops:
            self._gap = False   # from the listing on, the stream tells us
        for alloc_id in list(self.name_of):
            status = allocs.get(alloc_id)
            if status not in LIVE:
                if status in TERMINAL:
                    self.ended[alloc_id] = status
                self._ended(alloc_id)

    def _fire(self, name: str | None) -> None:
        if name is None:
            return
        for listener in self.listeners:
            try:
                listener(name)
            except Exception:
                log.exception("engine event listener failed for %s", name)
