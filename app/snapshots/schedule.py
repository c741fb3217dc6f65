"""Scheduled snapshots: every engine with a brain is looked at once per
ORCH_SNAPSHOT_INTERVAL_S, each at its own time (spread over the interval like health checks,
app.health_schedule), and copied only when its brain changed since its latest snapshot. On
Nomad only engines whose allocation runs are looked at: the sidecar beside the engine reads
the brain, and a stopped engine's brain has not changed since it stopped. A
replica snapshots the engines of its own shards (the reconciler's), so replicas share the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from app import errors, registry, states
from app.health_schedule import HealthSchedule
from app.operations import Engines, Op
from app.registry import EngineRow

log = logging.getLogger("orch.snapshots")

# Engines whose brain is at rest or in use; transient states are left to their operation.
WITH_BRAIN = (states.RUNNING, states.SLEEPING, states.STOPPED, states.FAILED)
MAX_TICK_S = 5.0


class SnapshotSchedule:
    def __init__(self, engines: Engines, mine: Callable[[EngineRow], bool]):
        self.engines = engines
        self.mine = mine
        self.interval = engines.settings.snapshot_interval_s
        self.plan = HealthSchedule(self.interval)
        # At rest nothing is read that cannot have changed: the rows again only after a write.
        self._changes = registry.Changes()
        self._rows: dict[int, EngineRow] = {}

    async def run_forever(self) -> None:
        if self.interval <= 0:
            return
        tick = min(MAX_TICK_S, self.interval / 10)
        while True:
            try:
                await self.tick(time.time())
            except errors.DomainError as exc:  # the database or the store out of reach
                log.warning("scheduled snapshots: %s", exc)
            await asyncio.sleep(tick)

    def _here(self, row: EngineRow) -> bool:
        """The brain is a directory this process reaches (the local driver's), or its driver
        copies it where it lives and the engine's allocation runs to do it (Nomad's sidecar,
        beside a running or paused engine)."""
        driver = self.engines.driver
        if driver.brain_dir(self.engines.bodies.spec(row)) is not None:
            return True
        paused = row.status == states.SLEEPING and self.engines.settings.sleep_mode == "pause"
        return driver.remote_snapshots() and (row.status == states.RUNNING or paused)

    async def tick(self, now: float) -> list[str]:
        """Take the snapshots due; returns the ids taken."""
        if self._changes.since_last_look():
            # A warm pool's engines wait for a user: nothing of anyone's to keep yet.
            self._rows = {r.id: r for r in registry.engines_in(WITH_BRAIN)
                          if not r.in_pool and self.mine(r) and self._here(r)}
            self.plan.replace(set(self._rows), now)
        taken = []
        for engine_id in self.plan.due(now):
            row = self._rows[engine_id]
            try:
                manifest = await self.engines.run(Op.SNAPSHOT, row.key, scheduled=True)
            except errors.DomainError as exc:  # busy, gone, the store down: next interval
                log.info("scheduled snapshot of %s skipped: %s", row.name, exc)
                continue
            if manifest is not None:
                taken.append(manifest["id"])
        return taken
