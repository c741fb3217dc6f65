"""Admit: the call products make on every user request.

In order: the product's rate limit, the lookup, auto-provision (quota applies), auto-wake, and
the answer. A running engine is the hot path: one conditional UPDATE (the limiter; batched under
load), one SELECT of the six columns the answer needs (a tuple, no model instance), and at most
one UPDATE a second per engine to record activity; the key comes from a cache. The answer here
and in _admitted must stay the same shape.
Anything else (provisioning, starting, failed-but-restarting) is waited for, at most the boot
timeout in all.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from app import errors, policy, registry, states
from app.drivers.base import DriverError
from app.lifecycle import Lifecycle, ProductRef
from app.registry import Engine

ACTIVITY_RESOLUTION_S = 1.0  # last_admit_at is written at most this often per engine
MAX_STEPS = 8


class Admitter:
    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle
        self.limiter = policy.Limiter()
        idle = lifecycle.settings.idle_sleep_s
        self.resolution = min(ACTIVITY_RESOLUTION_S, idle / 10) if idle > 0 else ACTIVITY_RESOLUTION_S

    async def admit(self, product: ProductRef, user_id: str, auto_provision: bool = False,
                    auto_wake: bool = False) -> dict[str, Any]:
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
                    "api_key": self.lifecycle.keys.decrypt(key_enc), "status": states.RUNNING,
                    "engine_version": engine_version, "provisioned": False, "woken": False}
        # Not running (or not there): the full row, re-read, for the slow path.
        engine = registry.find_engine(product.id, user_id) if row is not None else None
        return await self._slow(product, user_id, engine, auto_provision, auto_wake)

    async def _slow(self, product: ProductRef, user_id: str, engine: Engine | None,
                    auto_provision: bool, auto_wake: bool) -> dict[str, Any]:
        lifecycle = self.lifecycle
        deadline = time.monotonic() + lifecycle.settings.boot_timeout_s
        provisioned = woken = False
        for _ in range(MAX_STEPS):
            status = engine.status if engine is not None else None
            if status == states.RUNNING:
                return self._admitted(engine, time.time(), provisioned, woken)
            if status is None or status == states.DESTROYING:
                if not auto_provision:
                    return _denied("engine_not_found", status)
                try:
                    engine, _ = await lifecycle.provision(product, user_id)
                    provisioned = True
                except errors.ApiError as exc:
                    if exc.code != "ENGINE_ALREADY_EXISTS":  # made meanwhile (other replica)
                        raise
            elif status == states.SLEEPING:
                if not auto_wake:
                    return _denied("engine_sleeping", status)
                engine = await lifecycle.wake(engine)
                woken = True
            elif status in (states.STOPPED, states.STOPPING):
                return _denied("engine_stopped", status)
            elif status == states.FAILED:
                if not lifecycle.restartable(engine):
                    return _denied("engine_unhealthy", status)
                engine = await lifecycle.restart(engine)
            else:  # provisioning or starting: another operation owns it; wait for it
                await self._settled(engine, deadline)
            engine = registry.find_engine(product.id, user_id)
        raise errors.boot_timeout(f"the engine of user {user_id!r} did not become ready")

    async def _settled(self, engine: Engine, deadline: float) -> None:
        """Wait for the operation in flight on `engine`: here, or on another replica."""
        key = (engine.__data__["product"], engine.user_id)
        while True:
            flights = self.lifecycle.flights.current(key)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.boot_timeout(f"the engine of user {engine.user_id!r} did not become "
                                          f"ready within {self.lifecycle.settings.boot_timeout_s:g}s")
            if flights:
                done, _ = await asyncio.wait(flights, timeout=remaining)
                for future in done:
                    error = future.exception()
                    # A failed boot is this admit's failure too; another caller's refusal
                    # (409 to a /start, say) is not: the loop re-reads the row instead.
                    if isinstance(error, DriverError):
                        raise error
                return
            fresh = registry.reload(engine)
            if fresh is None or fresh.status not in (states.PROVISIONING, states.STARTING):
                return
            if fresh.lease_until is None or fresh.lease_until < time.time():
                await self.lifecycle.recover(fresh)  # its owner died
                return
            await asyncio.sleep(0.05)

    def _admitted(self, engine: Engine, now: float, provisioned: bool = False,
                  woken: bool = False) -> dict[str, Any]:
        if engine.last_admit_at is None or now - engine.last_admit_at >= self.resolution:
            registry.touch_admit(engine.id, now)
            engine.last_admit_at = now
        return {"admitted": True, "user_id": engine.user_id, "url": engine.url,
                "api_key": self.lifecycle.api_key(engine), "status": states.RUNNING,
                "engine_version": engine.engine_version, "provisioned": provisioned,
                "woken": woken}


def _denied(reason: str, status: str | None) -> dict[str, Any]:
    return {"admitted": False, "reason": reason, "status": status}
