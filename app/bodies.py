"""What each operation does to an engine: functions from the leased `EngineRow` to the next.

app.operations' TABLE names them as the operations' bodies, and the runner (app.runner) calls
them with the row's lease held and its flight joined; they do
the driver's work and write each state change with `registry.transition` (a compare-and-set
plus an audit event). An explicit operation on an existing engine pings the scheduler before
its first write, so "scheduler unavailable" changes nothing. `settle` finishes or rolls back
an operation whose owner died.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import IO, Literal

import httpx

from app import crypto, engine_http, errors, metrics, registry, states
from app.config import Settings
from app.crypto import KeyBox
from app.drivers.base import Driver, EngineSpec, State
from app.errors import BootTimeout, DriverError, EngineCrashed
from app.registry import EngineRow
from app.snapshots import bodies as snapshot_bodies
from app.snapshots import recovery
from app.snapshots.service import Manifest, Snapshots
from app.upgrades import Upgrader

BringUp = Literal["start", "wake", "restart"]

log = logging.getLogger("orch.lifecycle")

KEY_CONFIRM_S = 10.0
WAKE_TIMEOUT_S = 5.0  # a resumed engine that is not healthy by then is cold-started
QUICK_STOP_S = 5.0  # stopping what failed to boot: no need for the whole grace


class Bodies:
    def __init__(self, settings: Settings, driver: Driver, keys: KeyBox, http: httpx.AsyncClient):
        self.settings = settings
        self.driver = driver
        self.keys = keys
        self.http = http
        self._product_names: dict[int, str] = {}
        self._background: set[asyncio.Task[None]] = set()
        # A pooled engine's connection is opened when it joins the pool and kept: its claim
        # then costs one request, not a connection and a thread the engine starts for it.
        self.pool_http = engine_http.client(keepalive_s=None)
        self.upgrader = Upgrader(settings, driver, self.spec, self.api_key)
        self.snapshots = Snapshots(settings)

    # ---- explicit operations -------------------------------------------------------------------

    async def provision(self, row: EngineRow, api_key: str,
                        seed: tuple[str, Manifest] | None = None) -> tuple[EngineRow, str]:
        spec = self.spec(row)
        try:
            # from a snapshot, the brain is filled before the engine first runs
            state = await snapshot_bodies.create(self, row, api_key, seed)
        except (DriverError, errors.SnapshotStoreFailed, errors.InvalidRequest) as exc:
            # Nothing ran: leave nothing behind, not even the row (nor a seeded brain).
            if seed is not None:
                await self.driver.destroy(spec, None)
            registry.delete_engine(row, "provision_failed", exc.code.lower())
            raise
        row = registry.update(row, driver_state=state)
        try:
            row = await self._boot(row, spec)
        except DriverError as exc:
            if not isinstance(exc, (BootTimeout, EngineCrashed)):  # the scheduler went away
                await self._abandon(row, spec, exc)
            raise
        return row, api_key

    async def start(self, row: EngineRow) -> EngineRow:
        if row.status == states.RUNNING:
            raise errors.already_running(row.user_id)
        await self.driver.ping()
        return await self._bring_up(row, "start")

    async def stop(self, row: EngineRow) -> EngineRow:
        if row.status == states.STOPPED:
            raise errors.not_running(row.user_id, row.status)
        await self.driver.ping()
        row = await snapshot_bodies.before_stop(self, row)
        if row.status != states.STOPPING:
            row = registry.transition(row, "stop", "stop")
        state = await self.driver.stop(self.spec(row), row.driver_state, self.settings.stop_grace_s)
        return registry.transition(row, "stopped", driver_state=state, url=None)

    async def rotate_key(self, row: EngineRow) -> tuple[EngineRow, str]:
        url = row.url
        if row.status != states.RUNNING or url is None:
            raise errors.not_running(row.user_id, row.status)
        await self.driver.ping()
        old, new = self.api_key(row), crypto.new_engine_key()
        # Written first, so a crash mid-rotation leaves both keys for `settle`.
        row = registry.update(row, pending_key_enc=self.keys.encrypt(new))
        spec = self.spec(row)
        await self.driver.set_key(spec, row.driver_state, new)
        if not await engine_http.confirm_key(self.http, url, new, old, KEY_CONFIRM_S):
            await self.driver.set_key(spec, row.driver_state, old)
            registry.update(row, pending_key_enc=None)
            raise errors.KeyNotConfirmed("the engine did not confirm the new key; the old key still works")
        row = registry.update(row, audit_event="rotate_key", key_enc=row.pending_key_enc,
                              pending_key_enc=None)
        return row, new

    async def claim(self, row: EngineRow, was: str) -> tuple[EngineRow, str] | None:
        """A pooled engine just claimed (`starting`, leased): resumed if it waited paused,
        told its user, then `ready`. None: it did not take it, and it is gone (the caller
        provisions cold instead)."""
        spec = self.spec(row)
        resumed = was != states.SLEEPING or await self.driver.resume(spec, row.driver_state)
        if resumed and await self.identify(row):
            self.driver_claimed(spec, row.driver_state)
            return registry.pool.ready(row), self.api_key(row)
        log.info("claimed engine %s did not take its user; destroyed", row.name)
        await self.driver.destroy(spec, row.driver_state)
        registry.delete_engine(row, "destroyed", "claim_failed")
        return None

    async def identify(self, row: EngineRow) -> bool:
        if row.url is None:
            return False
        # As long as a cold provision would be given: a busy machine slows both alike.
        return await engine_http.tell_identity(self.pool_http, row.url, self.api_key(row), row.user_id,
                                               self.settings.boot_timeout_s)

    def driver_claimed(self, spec: EngineSpec, state: State) -> None:
        """Let the backend name the user (Nomad: the job's meta and Consul service), off the
        claim's path: the engine already knows, and the answer must not wait."""
        task = asyncio.create_task(self.driver.claimed(spec, state))
        self._background.add(task)
        task.add_done_callback(self._shown)

    def _shown(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The engine is the user's and knows it; only the backend's display is behind,
            # and the engine's next start renders its job for its user.
            log.warning("could not name the user of a claimed engine: %s", task.exception())

    async def upgrade(self, row: EngineRow, version: str) -> EngineRow:
        return await self.upgrader.upgrade(row, version)

    async def snapshot(self, row: EngineRow, scheduled: bool = False) -> Manifest | None:
        return await snapshot_bodies.snapshot(self, row, scheduled)

    async def import_brain(self, row: EngineRow, archive: IO[bytes], upload: str) -> Manifest:
        return await snapshot_bodies.import_brain(self, row, archive)

    async def restore(self, row: EngineRow, snapshot_id: str) -> EngineRow:
        return await snapshot_bodies.restore(self, row, snapshot_id)

    async def destroy(self, row: EngineRow) -> None:
        await self.driver.ping()
        if row.status != states.DESTROYING:
            row = registry.transition(row, "destroy", "destroy")
        await self.driver.destroy(self.spec(row), row.driver_state)
        await self.snapshots.delete_all(row.name)  # destroy removes the user's data, copies too
        registry.delete_engine(row)

    # ---- what the admit path and the reconciler start ----------------------------------------

    async def wake(self, row: EngineRow) -> EngineRow:
        if row.status != states.SLEEPING:
            return row  # someone else already moved it on
        return await self._bring_up(row, "wake")

    async def restart(self, row: EngineRow) -> EngineRow:
        if not self.restartable(row):
            return row
        if await recovery.unreachable(self, row):
            return recovery.wait_for_node(row)
        return await self._bring_up(row, "restart")

    async def restore_elsewhere(self, row: EngineRow) -> EngineRow:
        return await recovery.restore_elsewhere(self, row)

    async def tidy(self, row: EngineRow) -> EngineRow:
        return await recovery.tidy(self, row)

    async def sleep(self, row: EngineRow) -> EngineRow:
        if row.status != states.RUNNING or self.settings.idle_sleep_s <= 0:
            return row
        if row.in_pool and self.settings.sleep_mode != "pause":
            return row  # a stopped pooled engine would be no quicker to claim than a new one
        if self.idle_for(row, time.time()) < self.settings.idle_sleep_s:
            return row
        if self.settings.sleep_mode == "stop":
            row = await snapshot_bodies.before_stop(self, row)
        row = registry.transition(row, "sleep", "idle")
        spec = self.spec(row)
        if self.settings.sleep_mode == "pause":
            await self.driver.pause(spec, row.driver_state)
            return row
        state = await self.driver.stop(spec, row.driver_state, self.settings.stop_grace_s)
        return registry.update(row, driver_state=state, url=None)

    async def down(self, row: EngineRow) -> EngineRow:
        """`orch down`: the process ends, the brain stays, and the engine is left sleeping, so
        its user's next admit with auto_wake cold-starts it. Stopped and failed engines have
        no process; `stopped` stays the operator's or product's decision."""
        if row.status not in (states.RUNNING, states.SLEEPING):
            return row
        if row.status == states.RUNNING:
            row = registry.transition(row, "sleep", "down")
        state = await self.driver.stop(self.spec(row), row.driver_state, self.settings.stop_grace_s)
        return registry.update(row, driver_state=state, url=None)

    async def fail(self, row: EngineRow, seen: EngineRow, reason: str) -> EngineRow:
        # Only the incarnation that was seen failing: if the row moved on meanwhile (a
        # restart already replaced the process), the observation is stale.
        # A sleeping engine is failed only with its node: its brain has to move.
        failing = (states.RUNNING, states.SLEEPING) if reason == recovery.NODE_LOST else (states.RUNNING,)
        if row.status not in failing or row.row_version != seen.row_version:
            return row
        state = await self.driver.stop(self.spec(row), row.driver_state, self._quick_stop())
        return registry.transition(row, "fail", reason, failure_reason=reason, driver_state=state,
                                   url=None, next_restart_at=self._next_restart(row))

    async def reset_restarts(self, row: EngineRow, seen: EngineRow) -> EngineRow:
        """Healthy long enough: the restart count starts over (unless the row moved on)."""
        if row.status != states.RUNNING or row.row_version != seen.row_version or not row.restarts:
            return row
        return registry.update(row, restarts=0)

    async def recover(self, row: EngineRow) -> EngineRow:
        """Settling what a dead owner left (done before any body runs) is all there is."""
        return row

    async def remove_orphan(self, name: str) -> None:
        """Driver resources without a row: the name is all there is to go by."""
        registry.record_orphan_removed(name)
        await self.driver.destroy(EngineSpec(name, "", "", ""), None)

    # ---- settling what a dead owner left ---------------------------------------------------

    async def settle(self, row: EngineRow) -> EngineRow | None:
        """Finish or roll back the operation that left `row` transient; None: row gone."""
        spec = self.spec(row)
        if row.pending_key_enc is not None:
            row = await self._settle_rotation(row, spec)
        if row.status == states.DESTROYING:
            await self.driver.destroy(spec, row.driver_state)
            await self.snapshots.delete_all(row.name)
            registry.delete_engine(row, "destroyed", "recovered")
            return None
        if row.status == states.STOPPING:
            state = await self.driver.stop(spec, row.driver_state, self.settings.stop_grace_s)
            return registry.transition(row, "stopped", "recovered", driver_state=state, url=None)
        if row.status not in (states.PROVISIONING, states.STARTING):
            return row
        if row.previous_version is not None:  # an upgrade: back to the version that ran
            return await self.upgrader.settle(row)
        if not row.driver_state:  # died before the driver reported anything: roll back
            return await self._abandon(row, spec, None)
        if await self.driver.probe(spec, row.driver_state) == "healthy" and \
                (row.claimed_at is None or await self.identify(row)):  # a claim cut short
            return await self._boot(row, spec)
        state = await self.driver.stop(spec, row.driver_state, self._quick_stop())
        return registry.transition(row, "boot_failed", "interrupted", driver_state=state,
                                   url=None, failure_reason="interrupted",
                                   next_restart_at=self._next_restart(row))

    async def _settle_rotation(self, row: EngineRow, spec: EngineSpec) -> EngineRow:
        """A rotation died half-way: keep the new key if the engine took it, else the old."""
        assert row.pending_key_enc is not None
        new = self.keys.decrypt(row.pending_key_enc)
        if row.status == states.RUNNING and row.url and \
                await engine_http.accepts(self.http, row.url, new):
            return registry.update(row, audit_event="rotate_key", reason="recovered",
                                   key_enc=row.pending_key_enc, pending_key_enc=None)
        if row.driver_state:
            await self.driver.set_key(spec, row.driver_state, self.api_key(row))
        return registry.update(row, audit_event="rotate_key_rolled_back", reason="recovered",
                               pending_key_enc=None)

    async def _abandon(self, row: EngineRow, spec: EngineSpec,
                       exc: DriverError | None) -> EngineRow | None:
        """Remove an engine that never ran; if the driver cannot, leave it failed for later."""
        try:
            await self.driver.destroy(spec, row.driver_state)
        except DriverError:
            return registry.transition(row, "boot_failed", "abandoned", failure_reason="abandoned")
        registry.delete_engine(row, "provision_failed", exc.code.lower() if exc else "interrupted")
        return None

    # ---- booting ---------------------------------------------------------------------------

    async def bring_up(self, row: EngineRow, how: BringUp) -> EngineRow:
        """sleeping/stopped/failed -> running (for bodies outside this class)."""
        return await self._bring_up(row, how)

    async def _bring_up(self, row: EngineRow, how: BringUp) -> EngineRow:
        """sleeping/stopped/failed -> starting -> running: resume when paused, else cold start."""
        was = row.status
        # An explicit start forgives past crashes; an automatic restart is one more in a row.
        restarts = {"start": 0, "restart": row.restarts + 1}.get(how, row.restarts)
        row = registry.transition(row, "start", how, restarts=restarts, next_restart_at=None)
        spec = self.spec(row)
        if was == states.SLEEPING and self.settings.sleep_mode == "pause" \
                and await self.driver.resume(spec, row.driver_state):
            try:
                return await self._boot(row, spec, min(WAKE_TIMEOUT_S, self.settings.boot_timeout_s))
            except (BootTimeout, EngineCrashed):
                log.info("engine %s did not come back from pause; cold start", row.name)
        state = await self.driver.stop(spec, row.driver_state, self._quick_stop())
        try:
            state = await self.driver.launch(spec, state, self.api_key(row))
        except DriverError as exc:
            registry.transition(row, "boot_failed", exc.code.lower(), driver_state=state,
                                failure_reason=_placement_reason(exc), url=None,
                                next_restart_at=self._next_restart(row))
            raise
        row = registry.update(row, driver_state=state)
        return await self._boot(row, spec)

    async def _boot(self, row: EngineRow, spec: EngineSpec, timeout: float | None = None) -> EngineRow:
        """Wait for health, then `ready`. With an explicit timeout (a resumed engine), a
        failure is the caller's to handle; otherwise the engine becomes failed."""
        started = time.perf_counter()
        try:
            state, url = await self.driver.wait_ready(spec, row.driver_state,
                                                      timeout or self.settings.boot_timeout_s)
            metrics.BOOT_SECONDS.observe(time.perf_counter() - started)
        except (BootTimeout, EngineCrashed) as exc:
            if timeout is not None:
                raise
            reason = "boot_timeout" if isinstance(exc, BootTimeout) else "crashed"
            state = await self.driver.stop(spec, exc.state or row.driver_state, self._quick_stop())
            registry.transition(row, "boot_failed", reason, driver_state=state, url=None,
                                failure_reason=reason, next_restart_at=self._next_restart(row))
            raise
        return registry.transition(row, "ready", driver_state=state, url=url, failure_reason=None)

    # ---- small helpers ---------------------------------------------------------------------

    def spec(self, row: EngineRow) -> EngineSpec:
        # A pooled engine has no user yet: it is told one when claimed.
        user_id = "" if row.in_pool else row.user_id
        return EngineSpec(row.name, self.product_name(row.product_id), user_id, row.engine_version)

    def product_name(self, product_id: int) -> str:
        name = self._product_names.get(product_id)
        if name is None:
            name = self._product_names[product_id] = registry.product_name(product_id)
        return name

    def remember_product(self, product_id: int, name: str) -> None:
        self._product_names[product_id] = name

    def api_key(self, row: EngineRow) -> str:
        return self.keys.decrypt(row.key_enc)

    def restartable(self, row: EngineRow) -> bool:
        return row.status == states.FAILED and row.restarts < self.settings.max_restarts

    def idle_for(self, row: EngineRow, now: float) -> float:
        return now - max(row.last_admit_at or 0.0, row.status_since)

    def _quick_stop(self) -> float:
        return min(self.settings.stop_grace_s, QUICK_STOP_S)

    def _next_restart(self, row: EngineRow) -> float:
        backoff = self.settings.restart_backoff_s * float(2 ** min(row.restarts, 6))
        return time.time() + backoff


def _placement_reason(exc: DriverError) -> str:
    reason = getattr(exc, "reason", None)  # NodeLost says node_lost
    if isinstance(reason, str):
        return reason
    return {"PORT_EXHAUSTION": "port_exhausted"}.get(exc.code, "placement_failed")
