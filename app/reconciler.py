"""The background loop: compare the registry with what the driver sees, and repair drift.

Each pass: running engines are probed (dead -> failed `crashed`; unhealthy past the grace
period -> failed `unhealthy`; idle -> sleeping); failed engines with restarts left are restarted
once their backoff has passed; engines sitting in a transient state whose lease ran out (their
orchestrator died mid-operation) are finished or rolled back; driver resources with no row are
removed after a grace period. Every repair goes through the lifecycle, so it is a
compare-and-set with an audit event, under the row's lease: safe on every replica at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from app import errors, registry, states
from app.errors import DriverError
from app.lifecycle import Lifecycle
from app.registry import EngineRow

log = logging.getLogger("orch.reconciler")

PROBE_CONCURRENCY = 32
STABLE_AFTER_S = 60.0  # running this long without trouble: the restart count starts over


class Reconciler:
    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle
        self.settings = lifecycle.settings
        self._unhealthy_since: dict[int, float] = {}
        self._orphan_since: dict[str, float] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._last_sweep = 0.0

    async def run_forever(self) -> None:
        while True:
            try:
                await self.pass_once(wait=False)
            except Exception:
                log.exception("reconciler pass failed")
            try:
                await asyncio.to_thread(registry.checkpoint)
            except Exception as exc:  # noqa: BLE001 - a busy or missing file: next tick
                log.debug("checkpoint skipped: %s", exc)
            await asyncio.sleep(self.settings.tick_s)

    async def pass_once(self, wait: bool = True) -> dict[str, int]:
        """One pass. With wait, the repairs it starts are finished before it returns."""
        now = time.time()
        counts = {"probed": 0, "repairs": 0}
        running = registry.engines_in([states.RUNNING])
        counts["probed"] = len(running)
        semaphore = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def check(engine: EngineRow) -> None:
            async with semaphore:
                await self._check_running(engine, now)

        await asyncio.gather(*(check(e) for e in running))
        for engine in registry.engines_in([states.FAILED]):
            if self.lifecycle.restartable(engine) and (engine.next_restart_at or 0) <= now:
                self._spawn(self.lifecycle.restart(engine))
        for engine in registry.needing_recovery(now):
            self._spawn(self.lifecycle.recover(engine))
        await self._orphans(now)
        counts["repairs"] = len(self._inflight)
        if wait and self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        return counts

    async def _check_running(self, engine: EngineRow, now: float) -> None:
        lifecycle = self.lifecycle
        try:
            probe = await lifecycle.probe(engine)
        except DriverError as exc:
            # The scheduler is away: no news is not bad news. Judge the engine when it is back.
            log.debug("probe of %s skipped: %s", engine.name, exc)
            return
        if probe == "healthy":
            self._unhealthy_since.pop(engine.id, None)
            if engine.restarts and now - engine.status_since > STABLE_AFTER_S:
                self._spawn(lifecycle.reset_restarts(engine))
            idle = self.settings.idle_sleep_s
            if idle > 0 and lifecycle.idle_for(engine, now) >= idle:
                self._spawn(lifecycle.sleep_if_idle(engine))
        elif probe in ("dead", "node_lost"):  # issue 8: node_lost is its own reason
            self._spawn(lifecycle.fail(engine, "crashed" if probe == "dead" else probe))
        else:
            since = self._unhealthy_since.setdefault(engine.id, now)
            if now - since >= self.settings.health_grace_s:
                self._unhealthy_since.pop(engine.id, None)
                self._spawn(lifecycle.fail(engine, "unhealthy"))

    async def _orphans(self, now: float) -> None:
        """Driver resources with no row: left by a crash between create and insert/delete.
        Listing them is not cheap on a big fleet, so it runs once a lease period only."""
        # A row is inserted before its resources exist and deleted after they are gone, so a
        # name without a row is only ever transient for a lease's time; give it four.
        if now - self._last_sweep < self.settings.lease_s:
            return
        self._last_sweep = now
        try:
            orphans = await self.lifecycle.orphan_names()
        except DriverError as exc:
            log.warning("orphan sweep skipped: %s", exc)
            return
        for name in list(self._orphan_since):
            if name not in orphans:
                del self._orphan_since[name]
        for name in orphans:
            first = self._orphan_since.setdefault(name, now)
            if now - first >= 4 * self.settings.lease_s:
                del self._orphan_since[name]
                log.warning("removing orphaned engine resources %s", name)
                self._spawn(self.lifecycle.remove_orphan(name))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        error = None if task.cancelled() else task.exception()
        if isinstance(error, (errors.Busy, errors.EngineNotFound)):
            return  # another operation has the engine, or it is gone: the next pass looks again
        if error is not None:
            log.info("repair did not complete: %s", error)
