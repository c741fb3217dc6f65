"""Lifecycle operations: what each endpoint and the background loop do to an engine.

Each operation runs through `Flights` (one operation per engine in this process; callers of
the same operation are coalesced) and holds the engine row's lease (one operation per engine
across replicas). Inside, every state change is `registry.transition` (a compare-and-set plus
an audit event), and the driver does the work. An explicit operation on an existing engine
pings the scheduler before its first write, so "scheduler unavailable" changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from app import crypto, engine_http, errors, metrics, naming, registry, states
from app.config import Settings
from app.crypto import KeyBox
from app.drivers.base import BadVersion, BootTimeout, Driver, DriverError, EngineCrashed, EngineSpec, State
from app.flights import Flights
from app.registry import Engine

log = logging.getLogger("orch.lifecycle")
T = TypeVar("T")

KEY_CONFIRM_S = 10.0
WAKE_TIMEOUT_S = 5.0  # a resumed engine that is not healthy by then is cold-started


@dataclass(frozen=True)
class ProductRef:
    id: int
    name: str
    max_engines: int
    rate_limit_rpm: int


class Lifecycle:
    def __init__(self, settings: Settings, driver: Driver, keys: KeyBox):
        self.settings = settings
        self.driver = driver
        self.keys = keys
        self.flights = Flights()
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.http = engine_http.client()
        self._product_names: dict[int, str] = {}

    async def close(self) -> None:
        await self.http.aclose()

    # ---- operations (the API calls these) ---------------------------------------------------

    async def provision(self, product: ProductRef, user_id: str,
                        engine_version: str | None = None) -> tuple[Engine, str]:
        version = engine_version or self.settings.engine_image
        try:  # issue 8: the driver refuses what it cannot run (SPEC "Additions")
            self.driver.check_version(version)
        except BadVersion as exc:
            raise errors.invalid(str(exc)) from None
        return await self._run((product.id, user_id), "provision",
                                      lambda: self._provision(product, user_id, version))

    async def start(self, product: ProductRef, user_id: str) -> Engine:
        return await self._run((product.id, user_id), "start",
                                      lambda: self._start(product, user_id))

    async def stop(self, product: ProductRef, user_id: str) -> Engine:
        return await self._run((product.id, user_id), "stop",
                                      lambda: self._stop(product, user_id))

    async def rotate_key(self, product: ProductRef, user_id: str) -> tuple[Engine, str]:
        return await self._run((product.id, user_id), "rotate",
                                      lambda: self._rotate(product, user_id))

    async def destroy(self, product: ProductRef, user_id: str) -> None:
        await self._run((product.id, user_id), "destroy",
                               lambda: self._destroy(product, user_id))

    def get(self, product: ProductRef, user_id: str) -> Engine:
        engine = registry.find_engine(product.id, user_id)
        if engine is None:
            raise errors.engine_not_found(user_id)
        return engine

    # ---- operations the admit path and the background loop share -------------------------

    async def wake(self, engine: Engine) -> Engine:
        return await self._run(_key(engine), "wake", lambda: self._bring_up_op(engine, "wake"))

    async def restart(self, engine: Engine) -> Engine:
        return await self._run(_key(engine), "restart",
                                      lambda: self._bring_up_op(engine, "restart"))

    async def sleep_if_idle(self, engine: Engine) -> None:
        await self._run(_key(engine), "sleep", lambda: self._sleep(engine))

    async def fail(self, engine: Engine, reason: str) -> None:
        await self._run(_key(engine), "fail", lambda: self._fail(engine, reason))

    async def recover(self, engine: Engine) -> None:
        """Finish or roll back an operation whose owner died (its lease ran out)."""
        await self._run(_key(engine), "recover", lambda: self._recover_op(engine))

    def restartable(self, engine: Engine) -> bool:
        return engine.status == states.FAILED and engine.restarts < self.settings.max_restarts

    def idle_for(self, engine: Engine, now: float) -> float:
        return now - max(engine.last_admit_at or 0.0, engine.status_since)

    def spec(self, engine: Engine) -> EngineSpec:
        return EngineSpec(engine.name, self._product_name(engine), engine.user_id,
                          engine.engine_version)

    def api_key(self, engine: Engine) -> str:
        return self.keys.decrypt(engine.key_enc)

    # ---- implementations ------------------------------------------------------------------

    async def _provision(self, product: ProductRef, user_id: str, version: str) -> tuple[Engine, str]:
        existing = registry.find_engine(product.id, user_id)
        if existing is not None and existing.status == states.DESTROYING:
            await self._wait_gone(existing)
        api_key = crypto.new_engine_key()
        name = naming.engine_name(product.name, user_id)
        self._product_names[product.id] = product.name
        try:
            engine = registry.insert_engine(product.id, user_id, name, version,
                                            self.keys.encrypt(api_key), self.owner,
                                            self.settings.lease_s)
        except registry.AlreadyExists:
            raise errors.already_exists(user_id) from None
        except registry.QuotaExceeded as exc:
            raise errors.quota_exceeded(exc.args[0]) from None
        async with self._renewing(engine):
            spec = self.spec(engine)
            try:
                state = await self.driver.create(spec, api_key)
            except DriverError as exc:
                # Nothing ran: leave nothing behind, not even the row.
                registry.delete_engine(engine, "provision_failed", exc.code.lower())
                raise
            registry.update(engine, driver_state=state)
            try:
                await self._boot(engine, spec, state)
            except DriverError as exc:
                if not isinstance(exc, (BootTimeout, EngineCrashed)):  # the scheduler went away
                    await self._abandon(engine, spec, exc)
                raise
        return engine, api_key

    async def _start(self, product: ProductRef, user_id: str) -> Engine:
        async with self.lease(self.get(product, user_id)) as engine:
            engine = await self._settle(engine)
            if engine.status == states.RUNNING:
                raise errors.already_running(user_id)
            await self.driver.ping()
            return await self._bring_up(engine, "start")

    async def _stop(self, product: ProductRef, user_id: str) -> Engine:
        async with self.lease(self.get(product, user_id)) as engine:
            if engine.status == states.STOPPED:
                raise errors.not_running(user_id, engine.status)
            await self.driver.ping()
            if engine.status != states.STOPPING:
                registry.transition(engine, "stop", "stop")
            state = await self.driver.stop(self.spec(engine), engine.state, self.settings.stop_grace_s)
            return registry.transition(engine, "stopped", driver_state=state, url=None)

    async def _rotate(self, product: ProductRef, user_id: str) -> tuple[Engine, str]:
        async with self.lease(self.get(product, user_id)) as engine:
            if engine.status != states.RUNNING:
                raise errors.not_running(user_id, engine.status)
            await self.driver.ping()
            old, new = self.api_key(engine), crypto.new_engine_key()
            # Written first, so a crash mid-rotation leaves both keys for the reconciler.
            registry.update(engine, pending_key_enc=self.keys.encrypt(new))
            spec = self.spec(engine)
            await self.driver.set_key(spec, engine.state, new)
            if not await engine_http.confirm_key(self.http, engine.url, new, old, KEY_CONFIRM_S):
                await self.driver.set_key(spec, engine.state, old)
                registry.update(engine, pending_key_enc=None)
                raise errors.ApiError(503, "SCHEDULER_UNAVAILABLE",
                                      "the engine did not confirm the new key; the old key still works")
            registry.update(engine, audit="rotate_key", key_enc=engine.pending_key_enc,
                            pending_key_enc=None)
            return engine, new

    async def _destroy(self, product: ProductRef, user_id: str) -> None:
        async with self.lease(self.get(product, user_id)) as engine:
            await self.driver.ping()
            if engine.status != states.DESTROYING:
                registry.transition(engine, "destroy", "destroy")
            await self.driver.destroy(self.spec(engine), engine.state)
            registry.delete_engine(engine)

    async def _bring_up_op(self, engine: Engine, how: str) -> Engine:
        async with self.lease(engine) as engine:
            engine = await self._settle(engine)
            wanted = states.SLEEPING if how == "wake" else states.FAILED
            if engine.status != wanted or (how == "restart" and not self.restartable(engine)):
                return engine  # someone else already moved it on
            return await self._bring_up(engine, how)

    async def _bring_up(self, engine: Engine, how: str) -> Engine:
        """sleeping/stopped/failed -> starting -> running: resume when paused, else cold start."""
        was = engine.status
        restarts = {"start": 0, "restart": engine.restarts + 1}.get(how, engine.restarts)
        registry.transition(engine, "start", how, restarts=restarts, next_restart_at=None)
        spec, state = self.spec(engine), engine.state
        paused = was == states.SLEEPING and self.settings.sleep_mode == "pause"
        if paused and await self.driver.resume(spec, state):
            try:
                timeout = min(WAKE_TIMEOUT_S, self.settings.boot_timeout_s)
                return await self._boot(engine, spec, state, timeout=timeout)
            except (BootTimeout, EngineCrashed):
                log.info("engine %s did not come back from pause; cold start", engine.name)
        state = await self.driver.stop(spec, state, min(self.settings.stop_grace_s, 5.0))
        try:
            state = await self.driver.launch(spec, state, self.api_key(engine))
        except DriverError as exc:
            registry.transition(engine, "boot_failed", exc.code.lower(), driver_state=state,
                                failure_reason=_placement_reason(exc), url=None,
                                next_restart_at=self._next_restart(engine))
            raise
        registry.update(engine, driver_state=state)
        return await self._boot(engine, spec, state)

    async def _boot(self, engine: Engine, spec: EngineSpec, state: State,
                    timeout: float | None = None) -> Engine:
        """Wait for health, then `ready`. With an explicit timeout (a resumed engine), a
        failure is the caller's to handle; otherwise the engine becomes failed."""
        started = time.perf_counter()
        try:
            state, url = await self.driver.wait_ready(spec, state, timeout or self.settings.boot_timeout_s)
            metrics.BOOT_SECONDS.observe(time.perf_counter() - started)
        except (BootTimeout, EngineCrashed) as exc:
            if timeout is not None:
                raise
            reason = "boot_timeout" if isinstance(exc, BootTimeout) else "crashed"
            state = await self.driver.stop(spec, exc.state or state, min(self.settings.stop_grace_s, 5.0))
            registry.transition(engine, "boot_failed", reason, driver_state=state, url=None,
                                failure_reason=reason, next_restart_at=self._next_restart(engine))
            raise
        return registry.transition(engine, "ready", driver_state=state, url=url, failure_reason=None)

    async def _sleep(self, engine: Engine) -> None:
        async with self.lease(engine) as engine:
            if engine.status != states.RUNNING or self.settings.idle_sleep_s <= 0:
                return
            if self.idle_for(engine, time.time()) < self.settings.idle_sleep_s:
                return
            registry.transition(engine, "sleep", "idle")
            spec = self.spec(engine)
            if self.settings.sleep_mode == "pause":
                await self.driver.pause(spec, engine.state)
            else:
                state = await self.driver.stop(spec, engine.state, self.settings.stop_grace_s)
                registry.update(engine, driver_state=state, url=None)

    async def _fail(self, seen: Engine, reason: str) -> None:
        async with self.lease(seen) as engine:
            # Only the incarnation that was seen failing: if the row moved on meanwhile (a
            # restart already replaced the process), the observation is stale.
            if engine.status != states.RUNNING or engine.version != seen.version:
                return
            state = await self.driver.stop(self.spec(engine), engine.state,
                                           min(self.settings.stop_grace_s, 5.0))
            registry.transition(engine, "fail", reason, failure_reason=reason, driver_state=state,
                                url=None, next_restart_at=self._next_restart(engine))

    async def _recover_op(self, engine: Engine) -> None:
        async with self.lease(engine) as engine:
            await self._settle(engine)

    async def _settle(self, engine: Engine) -> Engine:
        """With the lease held, a transient state means its operation died: finish it."""
        spec = self.spec(engine)
        if engine.pending_key_enc is not None:
            engine = await self._settle_rotation(engine, spec)
        if engine.status == states.DESTROYING:
            await self.driver.destroy(spec, engine.state)
            registry.delete_engine(engine, "destroyed", "recovered")
            raise errors.engine_not_found(engine.user_id)
        if engine.status == states.STOPPING:
            state = await self.driver.stop(spec, engine.state, self.settings.stop_grace_s)
            return registry.transition(engine, "stopped", "recovered", driver_state=state, url=None)
        if engine.status not in (states.PROVISIONING, states.STARTING):
            return engine
        if not engine.state:  # died before the driver reported anything: roll back
            await self._abandon(engine, spec, None)
            raise errors.engine_not_found(engine.user_id)
        if await self.driver.probe(spec, engine.state) == "healthy":
            return await self._boot(engine, spec, engine.state)
        state = await self.driver.stop(spec, engine.state, min(self.settings.stop_grace_s, 5.0))
        return registry.transition(engine, "boot_failed", "interrupted", driver_state=state,
                                   url=None, failure_reason="interrupted",
                                   next_restart_at=self._next_restart(engine))

    async def _settle_rotation(self, engine: Engine, spec: EngineSpec) -> Engine:
        """A rotation died half-way: keep the new key if the engine took it, else the old."""
        new = self.keys.decrypt(engine.pending_key_enc)
        if engine.status == states.RUNNING and engine.url and \
                await engine_http.accepts(self.http, engine.url, new):
            return registry.update(engine, audit="rotate_key", reason="recovered",
                                   key_enc=engine.pending_key_enc, pending_key_enc=None)
        if engine.state:
            await self.driver.set_key(spec, engine.state, self.api_key(engine))
        return registry.update(engine, audit="rotate_key_rolled_back", reason="recovered",
                               pending_key_enc=None)

    async def _abandon(self, engine: Engine, spec: EngineSpec, exc: DriverError | None) -> None:
        """Remove an engine that never ran; if the driver cannot, leave it failed for later."""
        try:
            await self.driver.destroy(spec, engine.state)
        except DriverError:
            registry.transition(engine, "boot_failed", "abandoned", failure_reason="abandoned")
            return
        registry.delete_engine(engine, "provision_failed", exc.code.lower() if exc else "interrupted")

    async def _wait_gone(self, engine: Engine) -> None:
        deadline = time.monotonic() + self._lease_wait()
        while registry.reload(engine) is not None:
            if time.monotonic() > deadline:
                raise errors.busy(engine.user_id)
            await asyncio.sleep(0.05)

    async def _run(self, key: tuple[int, str], op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Single-flight `fn`, timed once per real run (joiners share it)."""
        async def timed() -> T:
            started = time.perf_counter()
            outcome = "error"
            try:
                result = await fn()
                outcome = "ok"
                return result
            finally:
                elapsed = time.perf_counter() - started
                metrics.OPERATION_SECONDS.labels(op, outcome).observe(elapsed)
                log.info("operation", extra={"operation": op, "user_id": key[1],
                                             "outcome": outcome, "duration_ms": round(elapsed * 1000, 3)})

        return await self.flights.run(key, op, timed)

    # ---- leases ------------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, engine: Engine) -> AsyncIterator[Engine]:
        """Hold the row's lease (waiting while another replica holds it), then re-read it."""
        deadline = time.monotonic() + self._lease_wait()
        while not registry.acquire_lease(engine, self.owner, self.settings.lease_s):
            if registry.reload(engine) is None:
                raise errors.engine_not_found(engine.user_id)
            if time.monotonic() > deadline:
                raise errors.busy(engine.user_id)
            await asyncio.sleep(0.05)
        fresh = registry.reload(engine)
        if fresh is None:
            raise errors.engine_not_found(engine.user_id)
        async with self._renewing(fresh):
            yield fresh

    @asynccontextmanager
    async def _renewing(self, engine: Engine) -> AsyncIterator[None]:
        async def renew() -> None:
            while True:
                await asyncio.sleep(self.settings.lease_s / 3)
                registry.acquire_lease(engine, self.owner, self.settings.lease_s)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            registry.release_lease(engine.id, self.owner)

    def _lease_wait(self) -> float:
        return self.settings.boot_timeout_s + self.settings.stop_grace_s + 2 * self.settings.lease_s

    def _next_restart(self, engine: Engine) -> float:
        backoff = self.settings.restart_backoff_s * (2 ** min(engine.restarts, 6))
        return time.time() + backoff

    def _product_name(self, engine: Engine) -> str:
        product_id = engine.__data__["product"]
        name = self._product_names.get(product_id)
        if name is None:
            name = self._product_names[product_id] = registry.Product.get_by_id(product_id).name
        return name


def _key(engine: Engine) -> tuple[int, str]:
    return (engine.__data__["product"], engine.user_id)


def _placement_reason(exc: DriverError) -> str:
    reason = getattr(exc, "reason", None)  # issue 8: NodeLost says node_lost
    if isinstance(reason, str):
        return reason
    return {"PORT_EXHAUSTION": "port_exhausted"}.get(exc.code, "placement_failed")
