"""Rollouts: a product's fleet moved to a new engine_version, batch by batch.

A rollout lives in the database (app/registry/rollouts.py): its row and one target per engine
chosen when it was created. The replica that holds the rollout's lease drives it (so it runs
on exactly one replica, and another takes over once the lease of a dead one runs out): each
batch is a set of ordinary upgrades (Op.UPGRADE through app.operations, so never beside
another operation on the same engine), and the next batch starts only when every upgrade of
this one has answered (an upgraded engine is a healthy one). More than `max_failures` failed
engines: every engine the rollout upgraded goes back to its previous version, then
`rolled_back`. Between batches the status is read again, so pause and abort take effect at
the next batch boundary. One replica drives up to ORCH_ROLLOUT_CONCURRENCY rollouts side by
side (two products' rollouts need not queue behind each other), each under its own lease.

Resuming after a crash is safe because an upgrade to the version an engine already has
changes nothing: a target whose upgrade was cut short is simply upgraded again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from app import errors, registry
from app.operations import Engines, Op
from app.registry.models import Rollout, RolloutTarget

log = logging.getLogger("orch.rollouts")

# How often a replica looks for rollouts to drive: a new (or resumed) one starts within this,
# whichever replica or CLI wrote it. A look is a query only when the database was written
# since the last one (registry.Changes), or a lease may have run out since (every third of a
# lease period): at rest, these polls were over half the queries of an orchestrator.
TICK_S = 1.0
rollouts = registry.rollouts


class RolloutRunner:
    def __init__(self, engines: Engines):
        self.engines = engines
        self.owner = engines.runner.owner
        self.lease_s = engines.settings.lease_s
        self.concurrency = engines.settings.rollout_concurrency
        self.drives: dict[int, asyncio.Task[None]] = {}  # rollout id -> its driver, here
        self._changes = registry.Changes()

    async def run_forever(self) -> None:
        looked = float("-inf")
        try:
            while True:
                try:
                    now = time.monotonic()
                    if self._changes.since_last_look() or now - looked >= self.lease_s / 3:
                        looked = now
                        self.start_runnable()
                except Exception:  # a bad tick must not end the loop; the next one retries
                    log.exception("rollout tick failed")
                    looked = float("-inf")
                await asyncio.sleep(TICK_S)
        finally:  # shutdown: each driver's own finally releases its lease
            for task in self.drives.values():
                task.cancel()
            await asyncio.gather(*self.drives.values(), return_exceptions=True)

    def start_runnable(self) -> list[asyncio.Task[None]]:
        """Drive every runnable rollout whose lease this replica gets, side by side, up to
        `concurrency` at once here (the rest wait for a slot, or for another replica)."""
        started = []
        for rollout in rollouts.runnable():
            if len(self.drives) >= self.concurrency:
                break
            if rollout.id in self.drives or not rollouts.acquire_rollout(
                    rollout.id, self.owner, self.lease_s):
                continue
            task = asyncio.create_task(self._leased(rollout.id))
            self.drives[rollout.id] = task
            task.add_done_callback(partial(self._ended, rollout.id))
            started.append(task)
        return started

    async def run_once(self) -> None:
        """Start what is runnable and wait until those drives end (tests, one-off runs)."""
        await asyncio.gather(*self.start_runnable())

    def _ended(self, rollout_id: int, task: asyncio.Task[None]) -> None:
        if self.drives.get(rollout_id) is task:
            del self.drives[rollout_id]

    async def _leased(self, rollout_id: int) -> None:
        """Drive one rollout with its lease held (renewed), then let the lease go."""
        renew = asyncio.create_task(self._renew(rollout_id))
        try:
            await self.drive(rollout_id)
        except Exception:  # the lease goes back; a later tick (here or elsewhere) retries
            log.exception("rollout %s: drive failed", rollout_id)
        finally:
            renew.cancel()
            rollouts.release_rollout(rollout_id, self.owner)

    async def _renew(self, rollout_id: int) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            rollouts.acquire_rollout(rollout_id, self.owner, self.lease_s)

    async def drive(self, rollout_id: int) -> None:
        """Batches until the rollout is done, paused or aborted (lease held)."""
        while True:
            rollout = rollouts.reload_rollout(rollout_id)
            if rollout is None or rollout.status != "running":
                return
            targets = rollouts.targets(rollout_id)
            if sum(1 for t in targets if t.state == "failed") > rollout.max_failures:
                await self._roll_back(rollout, targets)
                return
            pending = [t for t in targets if t.state == "pending"]
            if not pending:
                rollouts.set_status(rollout, ("running",), "succeeded")
                return
            batch = pending[:rollout.batch_size]
            await asyncio.gather(*(self._upgrade(rollout, t) for t in batch))

    async def _upgrade(self, rollout: Rollout, target: RolloutTarget) -> None:
        try:
            await self.engines.run(Op.UPGRADE, (rollout.product_id, target.user_id),
                                   version=rollout.to_version)
        except errors.EngineNotFound:
            rollouts.set_target(rollout.id, target.user_id, "gone", "destroyed meanwhile")
        except errors.DomainError as exc:
            rollouts.set_target(rollout.id, target.user_id, "failed", f"{exc.code}: {exc.message}")
        else:
            rollouts.set_target(rollout.id, target.user_id, "upgraded")

    async def _roll_back(self, rollout: Rollout, targets: list[RolloutTarget]) -> None:
        ok = True
        for target in targets:
            if target.state != "upgraded":
                continue
            try:
                await self.engines.run(Op.UPGRADE, (rollout.product_id, target.user_id),
                                       version=target.previous_version)
            except errors.EngineNotFound:
                pass
            except errors.DomainError as exc:
                log.warning("rollout %s: %s not rolled back: %s", rollout.id, target.user_id, exc)
                ok = False
                continue
            rollouts.set_target(rollout.id, target.user_id, "rolled_back")
        rollouts.set_status(rollout, ("running", "paused"), "rolled_back" if ok else "failed")

