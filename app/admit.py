"""Admit: the call products make on every user request.

In order: the product's rate limit, the lookup, auto-provision (quota applies), auto-wake, and
the answer. A running engine is the hot path: one conditional UPDATE (the limiter; batched under
load), one SELECT of the six columns the answer needs (a tuple, no row object), and at most
one UPDATE a second per engine to record activity; the key comes from a cache. The answer here
and in _admitted must stay the same shape.
Anything else (provisioning, starting, failed-but-restarting, a destroy left half-done) goes
through the operations table (app.operations), and the whole of it answers within the boot
timeout: past it, 504 BOOT_TIMEOUT while the operation carries on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from app import errors, policy, registry, states
from app.operations import Engines, Op, ProductRef
from app.registry import EngineRow

log = logging.getLogger("orch.admit")

ACTIVITY_RESOLUTION_S = 1.0  # last_admit_at is written at most this often per engine
MAX_STEPS = 8
# wait: false and a new engine: how long to wait for its row (not its boot), so that the
# quota and a driver's refusal are still answered as errors.
INSERT_WAIT_S = 2.0


class Admitter:
    def __init__(self, engines: Engines):
        self.engines = engines
        self.limiter = policy.Limiter()
        idle = engines.settings.idle_sleep_s
        self.resolution = min(ACTIVITY_RESOLUTION_S, idle / 10) if idle > 0 else ACTIVITY_RESOLUTION_S
        self._started: set[asyncio.Task[Any]] = set()  # wait: false's operations, referenced

    async def admit(self, product: ProductRef, user_id: str, auto_provision: bool = False,
                    auto_wake: bool = False, wait: bool = True) -> dict[str, Any]:
        now = time.time()
        retry_after = self.limiter.retry_after(product.id, product.rate_limit_rpm, now)
        if retry_after is not None:
            raise errors.rate_limited(retry_after)
        row = registry.find_engine_hot(product.id, user_id)
        if row is not None and row[1] == states.RUNNING:
            engine_id, _, url, key_enc, engine_version, last_admit_at = row
            if last_admit_at is None or now - last_admit_at >= self.resolution:
                registry.touch_admit(engine_id, now)
            return {"admitted": True, "user_id": user_id, "url": url,
                    "api_key": self.engines.keys.decrypt(key_enc), "status": states.RUNNING,
                    "engine_version": engine_version, "provisioned": False, "woken": False}
        # Not running (or not there): the full row, re-read, for the slow path.
        engine = registry.find_engine(product.id, user_id) if row is not None else None
        if not wait:
            return await self._at_once(product, user_id, engine, auto_provision, auto_wake)
        timeout = self.engines.settings.boot_timeout_s
        try:
            # The operations it starts run on (they are shielded flights); only the wait ends.
            return await asyncio.wait_for(
                self._slow(product, user_id, engine, auto_provision, auto_wake, timeout), timeout)
        except TimeoutError:
            raise errors.boot_timeout(f"the engine of user {user_id!r} did not become ready "
                                      f"within {timeout:g}s") from None

    async def _slow(self, product: ProductRef, user_id: str, engine: EngineRow | None,
                    auto_provision: bool, auto_wake: bool, timeout: float) -> dict[str, Any]:
        engines = self.engines
        key = (product.id, user_id)
        deadline = time.monotonic() + timeout
        provisioned = woken = False
        for _ in range(MAX_STEPS):
            if engine is None or engine.status == states.DESTROYING:
                if not auto_provision:
                    return _denied("engine_not_found", engine.status if engine else None)
                try:
                    engine, _ = await engines.run(Op.PROVISION, key, product_name=product.name)
                    provisioned = True
                except errors.EngineAlreadyExists:
                    pass  # made meanwhile (another replica): read it below
            elif engine.status == states.RUNNING:
                return self._admitted(engine, time.time(), provisioned, woken)
            elif engine.status == states.SLEEPING:
                if not auto_wake:
                    return _denied("engine_sleeping", engine.status)
                engine = await engines.run(Op.WAKE, key)
                woken = True
            elif engine.status in (states.STOPPED, states.STOPPING):
                return _denied("engine_stopped", engine.status)
            elif engine.status == states.FAILED:
                if not engines.bodies.restartable(engine):
                    return _denied("engine_unhealthy", engine.status)
                engine = await engines.run(Op.RESTART, key)
            else:  # provisioning or starting: another operation owns it; wait for it
                await engines.wait_for(engine, deadline - time.monotonic())
            if engine is not None and engine.status == states.RUNNING:
                continue  # answered at the top of the loop, without another read
            engine = registry.find_engine(product.id, user_id)
        raise errors.boot_timeout(f"the engine of user {user_id!r} did not become ready")

    async def _at_once(self, product: ProductRef, user_id: str, engine: EngineRow | None,
                       auto_provision: bool, auto_wake: bool) -> dict[str, Any]:
        """wait: false: start what the engine needs, answer without waiting for any boot:
        engine_starting while it provisions or starts."""
        engines = self.engines
        provisioned = False
        if engine is None or engine.status == states.DESTROYING:
            if not auto_provision:
                return _denied("engine_not_found", engine.status if engine else None)
            engine = await self._begin_provision(product, user_id)
            provisioned = True
        elif engine.status == states.SLEEPING:
            if not auto_wake:
                return _denied("engine_sleeping", engine.status)
            self._start(engines.run(Op.WAKE, engine.key))
            return _denied("engine_starting", states.STARTING)
        elif engine.status in (states.STOPPED, states.STOPPING):
            return _denied("engine_stopped", engine.status)
        elif engine.status == states.FAILED:
            if not engines.bodies.restartable(engine):
                return _denied("engine_unhealthy", engine.status)
            self._start(engines.run(Op.RESTART, engine.key))
            return _denied("engine_starting", states.STARTING)
        if engine is not None and engine.status == states.RUNNING:
            return self._admitted(engine, time.time(), provisioned)
        return _denied("engine_starting", engine.status if engine else states.PROVISIONING)

    async def _begin_provision(self, product: ProductRef, user_id: str) -> EngineRow | None:
        """Start provisioning in the background; wait for its row, never for its boot (a claim
        from the warm pool is waited for: it takes milliseconds). An error before the row
        exists (quota, the driver's refusal) is the caller's."""
        task = self._start(self.engines.run(Op.PROVISION, (product.id, user_id),
                                            product_name=product.name))
        deadline = time.monotonic() + INSERT_WAIT_S
        while not task.done() and time.monotonic() < deadline:
            found = registry.find_engine(product.id, user_id)
            if found is not None and found.claimed_at is None:  # a cold boot: not waited for
                return found
            await asyncio.sleep(0.005)  # none yet, or a claim from the warm pool (milliseconds)
        if task.done() and not task.cancelled():
            error = task.exception()
            if error is not None and not isinstance(error, errors.EngineAlreadyExists):
                raise error
        return registry.find_engine(product.id, user_id)

    def _start(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self._started.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._started.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Recorded on the engine (failed, with its reason) and in its audit trail.
            log.info("operation started by admit(wait=false) failed: %s", task.exception())

    def _admitted(self, engine: EngineRow, now: float, provisioned: bool = False,
                  woken: bool = False) -> dict[str, Any]:
        if engine.last_admit_at is None or now - engine.last_admit_at >= self.resolution:
            registry.touch_admit(engine.id, now)
        return {"admitted": True, "user_id": engine.user_id, "url": engine.url,
                "api_key": self.engines.bodies.api_key(engine), "status": states.RUNNING,
                "engine_version": engine.engine_version, "provisioned": provisioned,
                "woken": woken, "from_pool": provisioned and engine.claimed_at is not None}


def _denied(reason: str, status: str | None) -> dict[str, Any]:
    return {"admitted": False, "reason": reason, "status": status}
