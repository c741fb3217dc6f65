"""The background loop: compare the registry with what the driver sees, and repair drift.

What it looks at (a fleet's cost at rest must not grow with every engine each tick):
- an engine's end is an event where the driver has them (the local driver's pidfds, the Nomad
  driver's event stream and Consul blocking queries): the engine is probed once, then failed
  `crashed`, at once;
- each running engine is health-checked every ORCH_HEALTH_INTERVAL_S, at its own jittered time
  (`HealthSchedule`), not all of them every tick: dead -> failed `crashed`, unhealthy past the
  grace period -> failed `unhealthy`;
- idle engines (no admit for ORCH_IDLE_SLEEP_S) are found by one indexed query (every
  hundredth of that period, at least every tick), and put to sleep;
- failed engines with restarts left are restarted once their backoff has passed; engines in a
  transient state whose lease ran out (their orchestrator died mid-operation) are finished or
  rolled back; driver resources with no row are removed after a grace period;
- every ORCH_RESYNC_S a full resync re-reads every running row: the safety net for a missed
  event (the schedule and the driver's watches are rebuilt from it);
- at rest nothing is read that cannot have changed: the rows that entered `running` and the
  failed ones to restart are read again only when the database was written since the last
  tick (`registry.Changes`; always on PostgreSQL), and the restarts' backoff runs on the rows
  already read;
- replicas share the work: each does only the engines of the shards it holds a lease on
  (app.registry.shards, renewed three times a lease period), so R replicas together do one's
  work, and a dead replica's shards are taken over within ORCH_LEASE_S.
Every repair is an operation of the table (app.operations), so it is a compare-and-set with
an audit event, under the row's lease: safe on every replica at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Iterable
from typing import Any

from app import errors, registry, states
from app.drivers.base import LEFTOVERS
from app.errors import DriverError, NodeLost
from app.health_schedule import HealthSchedule
from app.operations import Engines, Op
from app.registry import EngineRow, shards
from app.registry.db import checkpoint_due

log = logging.getLogger("orch.reconciler")

PROBE_CONCURRENCY = 32
STABLE_AFTER_S = 60.0  # running this long without trouble: the restart count starts over
CLOCK_SKEW_S = 5.0  # replicas' clocks may differ this much: "entered running since" looks back by it


class Reconciler:
    def __init__(self, engines: Engines):
        self.engines = engines
        self.settings = engines.settings
        self.schedule = HealthSchedule(self.settings.health_interval_s)
        self._unhealthy_since: dict[int, float] = {}
        self._orphan_since: dict[str, float] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._last: dict[str, float] = {}  # chore -> when it last ran
        self._seen_until = 0.0  # rows that entered `running` before this are scheduled
        self._changes = registry.Changes()
        self._failed: list[EngineRow] = []  # this replica's restartable failed rows, as last read
        self._lost: list[EngineRow] = []  # failed node_lost, as last read
        self._untidy: list[EngineRow] = []  # driver state with leftovers, as last read
        self._sleeping: list[EngineRow] = []  # sleeping, as last read (their node may be lost)
        self._brains_stale = True
        # Each scheduled engine's row as last read (resync, entered_since), so a
        # check needs no database read; a check that finds trouble reads the row again.
        self._rows: dict[int, EngineRow] = {}
        self.probes = 0  # health checks sent (tests and the bench read it)
        self.shards: frozenset[int] | None = None  # None: every engine (`orch reconcile`)
        self.exit_events = 0
        self.events = engines.driver.on_exit(self._on_exit)

    async def run_forever(self) -> None:
        try:
            while True:
                try:
                    self.heartbeat(time.time())
                    await self.tick()
                except Exception:
                    log.exception("reconciler pass failed")
                try:
                    if checkpoint_due():  # at rest, most ticks wrote nothing
                        await asyncio.to_thread(registry.checkpoint)
                except Exception as exc:  # noqa: BLE001 - a busy or missing file: next tick
                    log.debug("checkpoint skipped: %s", exc)
                await asyncio.sleep(self.settings.tick_s)
        finally:
            if self.shards is not None:
                try:  # a clean shutdown hands its shards over now, not a lease later
                    shards.release(self.engines.runner.owner)
                except Exception as exc:  # noqa: BLE001 - the lease runs out anyway
                    log.debug("shards not released: %s", exc)

    def heartbeat(self, now: float) -> None:
        """Renew this replica's shards (three times a lease period); when they change, the
        next tick resyncs."""
        lease = self.settings.lease_s
        if self.shards is not None and not self._due("shards", lease / 3, now):
            return
        self._last["shards"] = now
        # Held two thirds of a lease, renewed every third: a dead replica's shards are free
        # within 2/3 of a lease and taken at the next heartbeat, within ORCH_LEASE_S in all.
        held = shards.claim(self.engines.runner.owner, lease * 2 / 3, now, gone=_gone)
        if held != self.shards:  # gained: engines to look at; lost: engines to leave
            self._last.pop("resync", None)
        self.shards = held

    def mine(self, row: EngineRow) -> bool:
        """Is this engine in one of this replica's shards (or is this a full pass)?"""
        return self.shards is None or shards.shard_of(row.id) in self.shards

    async def tick(self, now: float | None = None) -> dict[str, int]:
        """One step of the loop: the engines whose check is due, and the chores."""
        now = time.time() if now is None else now
        changed = self._changes.since_last_look()  # before the reads: a later write is seen next tick
        if self._due("resync", self.settings.resync_s, now):
            self.resync(now)
        elif changed:
            self._schedule_new(now)
        due = self.schedule.due(now)
        rows = [self._rows[i] for i in due if i in self._rows]
        unknown = [i for i in due if i not in self._rows]  # none, unless a bug: read them
        if unknown:
            rows += self._remember(registry.engines_by_ids(unknown, states.RUNNING))
            self.schedule.keep_only_among(unknown, {r.id for r in rows})
        await self._check_all(rows, now, cached=True)
        await self._chores(now, recovery=self._due("recovery", self.settings.lease_s / 4, now),
                           changed=changed)
        return {"probed": len(rows), "repairs": len(self._inflight)}

    async def pass_once(self, wait: bool = True) -> dict[str, int]:
        """A full pass: every running engine checked now (`orch reconcile`, tests). With wait,
        the repairs it starts are finished before it returns."""
        now = time.time()
        self.shards = None  # a full pass looks at every engine, whoever holds its shard
        running = self.resync(now)
        await self._check_all(running, now)
        await self._chores(now, recovery=True)
        counts = {"probed": len(running), "repairs": len(self._inflight)}
        if wait and self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        return counts

    def resync(self, now: float) -> list[EngineRow]:
        """Re-read every running row: schedule the new ones, drop the gone ones, and have the
        driver watch each (an engine that ended unseen is reported at once)."""
        running = [r for r in registry.engines_in([states.RUNNING]) if self.mine(r)]
        self._last["resync"] = now
        self._seen_until = now
        self.schedule.replace({r.id for r in running}, now)
        self._rows = {r.id: r for r in running}
        if self.events:
            for row in running:
                self.engines.driver.watch(self.engines.bodies.spec(row), row.driver_state)
        return running

    # ---- events -----------------------------------------------------------------------------

    def _on_exit(self, name: str) -> None:
        self.exit_events += 1
        self._spawn(self._exited(name))

    async def _exited(self, name: str) -> None:
        row = registry.engine_named(name)
        if row is None or row.status != states.RUNNING:
            return  # being stopped, restarted or destroyed: that operation knows
        await self._check_running(row, time.time())

    # ---- health ----------------------------------------------------------------------------

    def _schedule_new(self, now: float) -> None:
        since = self._seen_until - CLOCK_SKEW_S
        self._seen_until = now
        entered = self._remember(r for r in registry.entered_since(states.RUNNING, since) if self.mine(r))
        fresh = [r for r in entered if r.id not in self.schedule]
        self.schedule.add((r.id for r in fresh), now)
        if self.events:
            for row in fresh:
                self.engines.driver.watch(self.engines.bodies.spec(row), row.driver_state)

    def _remember(self, rows: Iterable[EngineRow]) -> list[EngineRow]:
        rows = list(rows)
        self._rows.update((r.id, r) for r in rows)
        return rows

    async def _check_all(self, rows: Iterable[EngineRow], now: float, cached: bool = False) -> None:
        semaphore = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def check(engine: EngineRow) -> None:
            async with semaphore:
                await self._check_running(engine, now, cached)

        await asyncio.gather(*(check(e) for e in rows))

    async def _check_running(self, engine: EngineRow, now: float, cached: bool = False) -> None:
        """Probe a running engine and act on the answer. `cached`: the row is as last read, and
        is read again before anything is done about it."""
        engines = self.engines
        self.probes += 1
        try:
            probe = await engines.driver.probe(engines.bodies.spec(engine), engine.driver_state)
        except DriverError as exc:
            # The scheduler is away: no news is not bad news. Judge the engine when it is back.
            log.debug("probe of %s skipped: %s", engine.name, exc)
            return
        needs_row = probe != "healthy" or (engine.restarts and now - engine.status_since > STABLE_AFTER_S)
        if cached and needs_row:
            current = self._reread(engine, now)
            if current is None:
                return
            engine = current
        if probe == "healthy":
            self._unhealthy_since.pop(engine.id, None)
            if engine.restarts and now - engine.status_since > STABLE_AFTER_S:
                self._spawn(engines.run(Op.RESET_RESTARTS, engine.key, seen=engine))
        elif probe in ("dead", "node_lost"):  # node_lost is its own reason
            reason = "crashed" if probe == "dead" else probe
            self._spawn(engines.run(Op.FAIL, engine.key, seen=engine, reason=reason))
        else:
            since = self._unhealthy_since.setdefault(engine.id, now)
            if now - since >= self.settings.health_grace_s:
                self._unhealthy_since.pop(engine.id, None)
                self._spawn(engines.run(Op.FAIL, engine.key, seen=engine, reason="unhealthy"))
            else:  # look again soon: the grace period, not the interval, decides
                self.schedule.soon(engine.id, now + min(self.settings.tick_s, self.settings.health_grace_s))

    def _reread(self, engine: EngineRow, now: float) -> EngineRow | None:
        """The row again, before acting on a check of its cached copy; None: nothing to do (it
        is not running any more, or runs elsewhere now and is checked again soon)."""
        rows = registry.engines_by_ids([engine.id], states.RUNNING)
        if not rows:
            self._rows.pop(engine.id, None)
            self.schedule.keep_only_among([engine.id], set())
            return None
        current = self._remember(rows)[0]
        if current.driver_state != engine.driver_state:  # restarted or moved: probe that one
            self.schedule.soon(engine.id, now)
            return None
        return current

    # ---- chores ----------------------------------------------------------------------------

    async def _chores(self, now: float, recovery: bool, changed: bool = True) -> None:
        idle = self.settings.idle_sleep_s
        # An engine falls idle as time passes, not by a write: looked for on a cadence that
        # is a hundredth of the idle period (9 s for the default 15 min), every tick at most.
        if idle > 0 and self._due("idle", min(idle / 100, 10.0), now):
            # A pooled engine waits paused in pause mode; in stop mode it keeps running.
            pooled_sleep = self.settings.sleep_mode == "pause"
            for engine in filter(self.mine, registry.idle_running(now - idle)):
                if pooled_sleep or not engine.in_pool:
                    self._spawn(self.engines.run(Op.SLEEP, engine.key))
        if changed:
            self._failed = [e for e in registry.restartable_failed(self.settings.max_restarts)
                            if self.mine(e) and self.engines.bodies.restartable(e)
                            and not e.in_pool]  # the pool replaces its failed engines
        for engine in self._failed:
            if (engine.next_restart_at or 0) <= now:
                self._spawn(self.engines.run(Op.RESTART, engine.key))
        if recovery:  # not an indexed read (pending keys): a few times a lease period
            for engine in filter(self.mine, registry.needing_recovery(now)):
                self._spawn(self.engines.run(Op.RECOVER, engine.key))
        await self._brains(now, changed)
        await self._orphans(now)

    async def _brains(self, now: float, changed: bool) -> None:
        """Engines whose node was lost long enough, created again elsewhere from a snapshot;
        what drivers left on nodes that were down, removed once they are back. The rows are
        read again only when the database was written since (a node's return is no write)."""
        wait = self.settings.node_lost_restore_s
        self._brains_stale |= changed
        if not self._due("brains", min(self.settings.lease_s, max(wait / 10, self.settings.tick_s)), now):
            return
        if self._brains_stale:
            self._brains_stale = False
            # A warm pool's engine has nothing of anyone's to restore: the pool replaces it.
            lost = registry.failed_because(NodeLost.reason) if wait > 0 else []
            self._lost = [e for e in lost if self.mine(e) and not e.in_pool]
            self._untidy = [e for e in registry.with_state_key(LEFTOVERS) if self.mine(e)]
            self._sleeping = [e for e in registry.engines_in([states.SLEEPING])
                              if self.mine(e) and not e.in_pool] if wait > 0 else []
        await self._stranded()
        for engine in self._lost:
            if now - engine.status_since >= wait:
                self._spawn(self.engines.run(Op.RESTORE_ELSEWHERE, engine.key))
        for engine in self._untidy:
            self._spawn(self.engines.run(Op.TIDY, engine.key))

    async def _stranded(self) -> None:
        """Sleeping engines (which nothing else watches) whose node is down: failed
        `node_lost`, so that they too are restored elsewhere in time."""
        try:
            names = await self.engines.driver.stranded({e.name: e.driver_state for e in self._sleeping})
        except DriverError as exc:
            log.debug("stranded engines not looked for: %s", exc)
            return
        for engine in self._sleeping:
            if engine.name in names:
                self._spawn(self.engines.run(Op.FAIL, engine.key, seen=engine, reason=NodeLost.reason))

    def _due(self, chore: str, every: float, now: float) -> bool:
        if now - self._last.get(chore, float("-inf")) < every:
            return False
        self._last[chore] = now
        return True

    async def _orphans(self, now: float) -> None:
        """Driver resources with no row: left by a crash between create and insert/delete.
        Listing them is not cheap on a big fleet, so it runs once a lease period only."""
        # A row is inserted before its resources exist and deleted after they are gone, so a
        # name without a row is only ever transient for a lease's time; give it four.
        if self.shards is not None and 0 not in self.shards:
            return  # one replica sweeps: shard 0's
        if not self._due("orphans", self.settings.lease_s, now):
            return
        try:
            orphans = await self._orphan_names()
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
                self._spawn(self.engines.run(Op.REMOVE_ORPHAN, (0, name)))  # no product has id 0

    async def _orphan_names(self) -> set[str]:
        """Names the driver holds resources for that have no registry row."""
        found = await self.engines.driver.list_names()
        return found - registry.known_names(found)

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


def _gone(owner: str) -> bool:
    """A replica of this host (runner owners are host:pid:nonce) whose process is gone: its
    shards need not wait out their lease (a restarted orchestrator takes them at once). A
    reused pid only makes it wait for the lease, as for a replica on another host."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname()[:32] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
