"""The warm pool: engines booted ahead of their users, so that a new user's first admit is a
claim (one compare-and-set, app.registry.pool.claim) rather than a boot.

`Refiller` runs on every replica; for each product with a pool it works out what the pool
needs (replace failed engines and engines on a version new users no longer get; drop what is
over the target; boot what is missing) and, only when something is needed, takes the
product's pool lease, so one replica at a time does it. Pooled engines are provisioned and
destroyed through the operations table like any other engine (app.operations); they count
toward the product's `max_engines`, so the quota's one transaction keeps the pool from ever
pushing a product past it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from app import engine_http, errors, metrics, registry, states
from app.operations import Engines, Op
from app.registry import EngineRow, Product

log = logging.getLogger("orch.pool")

TICK_S = 0.5  # how soon a claim elsewhere, or a failed pooled engine, is noticed
FULL_LOOK_S = 5.0  # a look even when nothing was committed (a lease that ran out, say)
FILL_CONCURRENCY = 4  # engines booted at once per product: a burst of boots slows every one


@dataclass(frozen=True)
class Needs:
    version: str
    remove: list[EngineRow]
    missing: int

    @property
    def any(self) -> bool:
        return bool(self.remove) or self.missing > 0


def needs(product: Product, rows: list[EngineRow], version: str) -> Needs:
    """Replace failed pooled engines and those on another version; keep `warm_pool`."""
    stale = [r for r in rows if r.status == states.FAILED
             or (r.engine_version != version and r.status != states.DESTROYING)]
    keep = [r for r in rows if r not in stale and r.status != states.DESTROYING]
    target = int(product.warm_pool)
    surplus = keep[target:]  # the newest go first: the oldest are the most likely ready
    return Needs(version, stale + surplus, max(0, target - len(keep)))


class Refiller:
    def __init__(self, engines: Engines):
        self.engines = engines
        self.settings = engines.settings
        self.owner = engines.runner.owner
        self._changes = registry.Changes()

    async def run_forever(self) -> None:
        looked = 0.0
        while True:
            now = time.monotonic()
            if self._changes.since_last_look() or now - looked >= FULL_LOOK_S:
                looked = now
                try:
                    await self.tick()
                except Exception:  # the loop outlives any one pass
                    log.exception("warm pool pass failed")
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        for product in registry.pool.pool_products():
            version = self.engines.default_version(product.id)
            wanted = needs(product, registry.pool.pooled(product.id), version)
            if not wanted.any:
                continue
            if not registry.pool.take_lease(product.id, self.owner, self.settings.lease_s):
                continue  # another replica refills it
            try:
                await self.refill(product, wanted)
            finally:
                registry.pool.give_back_lease(product.id, self.owner)

    async def refill(self, product: Product, wanted: Needs) -> None:
        renew = asyncio.create_task(self._renew(product.id))
        try:
            await asyncio.gather(*(self._remove(r) for r in wanted.remove))
            slots = asyncio.Semaphore(FILL_CONCURRENCY)
            await asyncio.gather(*(self._fill(product, wanted.version, slots)
                                   for _ in range(wanted.missing)))
        finally:
            renew.cancel()

    async def _renew(self, product_id: int) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            registry.pool.take_lease(product_id, self.owner, self.settings.lease_s)

    async def _remove(self, row: EngineRow) -> None:
        try:
            await self.engines.run(Op.DESTROY, row.key)
        except errors.EngineNotFound:
            pass  # claimed meanwhile (its user id changed), or gone
        except errors.DomainError as exc:
            log.info("pooled engine %s not removed yet: %s", row.name, exc)

    async def _fill(self, product: Product, version: str, slots: asyncio.Semaphore) -> None:
        async with slots:
            started = time.perf_counter()
            try:
                row, key = await self.engines.run(
                    Op.PROVISION, (product.id, registry.pool.new_pool_user()),
                    product_name=product.name, engine_version=version, in_pool=True)
            except errors.QuotaExceeded:
                return  # the pool never pushes a product past its quota
            except errors.DomainError as exc:
                log.info("pooled engine for %s not booted: %s", product.name, exc)
                return
            metrics.POOL_REFILL_SECONDS.observe(time.perf_counter() - started)
            if row.url is not None:
                # One authorised call now, so that the claim's is not the engine's first: a
                # first request pays for code paths and threads the engine has not yet run
                # (some 70 ms for the reference engine, against 3 for the next ones).
                await engine_http.accepts(self.engines.bodies.pool_http, row.url, key)
