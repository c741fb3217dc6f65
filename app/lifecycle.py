"""The lifecycle's entry points: what the API, the admit path and the reconciler call.

Each one hands an operation (app.operations) to the runner (app.runner), which holds the
flight and the lease, settles what a dead owner left, and times it. Nothing here touches a
lease, a flight or the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from app import crypto, engine_http, errors, naming, registry, states
from app.config import Settings
from app.crypto import KeyBox
from app.drivers.base import Driver, Probe
from app.operations import Operations
from app.registry import EngineRow
from app.runner import Op, Runner


@dataclass(frozen=True)
class ProductRef:
    id: int
    name: str
    max_engines: int
    rate_limit_rpm: int


class Lifecycle:
    def __init__(self, settings: Settings, driver: Driver, keys: KeyBox):
        self.settings = settings
        self.driver = driver  # for the API's /readyz and shutdown
        self.keys = keys
        self.http = engine_http.client()
        self.ops = Operations(settings, driver, keys, self.http)
        self.runner = Runner(settings, self.ops.settle)

    async def close(self) -> None:
        await self.http.aclose()

    # ---- the API's operations --------------------------------------------------------------

    async def provision(self, product: ProductRef, user_id: str,
                        engine_version: str | None = None) -> tuple[EngineRow, str]:
        version = engine_version or self.settings.engine_image
        self.driver.check_version(version)  # the driver refuses what it cannot run (SPEC "Additions")
        self.ops.remember_product(product.id, product.name)
        api_key = crypto.new_engine_key()

        def insert() -> EngineRow:
            return registry.insert_engine(product.id, user_id, naming.engine_name(product.name, user_id),
                                          version, self.keys.encrypt(api_key), self.runner.owner,
                                          self.settings.lease_s)

        return await self.runner.create((product.id, user_id), insert,
                                        partial(self.ops.provision, api_key=api_key))

    async def start(self, product: ProductRef, user_id: str) -> EngineRow:
        return await self.runner.run(Op.START, (product.id, user_id), self.ops.start)

    async def stop(self, product: ProductRef, user_id: str) -> EngineRow:
        # A stop that died half-way is finished by this one rather than settled first.
        return await self.runner.run(Op.STOP, (product.id, user_id), self.ops.stop,
                                     handles=frozenset({states.STOPPING}))

    async def rotate_key(self, product: ProductRef, user_id: str) -> tuple[EngineRow, str]:
        return await self.runner.run(Op.ROTATE, (product.id, user_id), self.ops.rotate_key)

    async def upgrade(self, product: ProductRef, user_id: str, engine_version: str) -> EngineRow:
        """Issue 13: restart a running engine on `engine_version` (brain kept; rolled back and
        UpgradeFailed when it is not healthy in time), or record it for the next start."""
        self.driver.check_version(engine_version)
        try:
            return await self.runner.run(Op.UPGRADE, (product.id, user_id),
                                         partial(self.ops.upgrade, version=engine_version),
                                         flight=f"{Op.UPGRADE.value}:{engine_version}")
        except errors.Busy:  # the spec answers an upgrade held off past the wait with a 409
            raise errors.engine_busy(user_id) from None

    async def destroy(self, product: ProductRef, user_id: str) -> None:
        # Destroy applies from every state, half-done ones included: nothing to settle first.
        await self.runner.run(Op.DESTROY, (product.id, user_id), self.ops.destroy, settle=False)

    def get(self, product: ProductRef, user_id: str) -> EngineRow:
        row = registry.find_engine(product.id, user_id)
        if row is None:
            raise errors.engine_not_found(user_id)
        return row

    # ---- the admit path's and the reconciler's ---------------------------------------------

    async def wake(self, row: EngineRow) -> EngineRow:
        return await self.runner.run(Op.WAKE, row.key, self.ops.wake)

    async def restart(self, row: EngineRow) -> EngineRow:
        return await self.runner.run(Op.RESTART, row.key, self.ops.restart)

    async def sleep_if_idle(self, row: EngineRow) -> None:
        await self.runner.run(Op.SLEEP, row.key, self.ops.sleep, wait=False)

    async def fail(self, row: EngineRow, reason: str) -> None:
        await self.runner.run(Op.FAIL, row.key, partial(self.ops.fail, seen=row, reason=reason))

    async def reset_restarts(self, row: EngineRow) -> None:
        # Never waits: an operation holding the row decides its restart count itself.
        await self.runner.run(Op.RESET_RESTARTS, row.key, partial(self.ops.reset_restarts, seen=row),
                              wait=False)

    async def recover(self, row: EngineRow) -> None:
        """Finish or roll back an operation whose owner died (its lease ran out)."""
        await self.runner.run(Op.RECOVER, row.key, _unchanged)

    async def wait_for(self, row: EngineRow, timeout: float) -> None:
        """Wait for the operation in flight on `row` (here or elsewhere), at most `timeout`."""
        await self.runner.wait_for(row, timeout)

    async def probe(self, row: EngineRow) -> Probe:
        return await self.driver.probe(self.ops.spec(row), row.driver_state)

    def on_exit(self, listener: Callable[[str], None]) -> bool:
        """Issue 11: have the driver call `listener(name)` when an engine ends (False: it can't)."""
        return self.driver.on_exit(listener)

    def watch(self, row: EngineRow) -> None:
        """Issue 11: have the driver watch a running engine for its end (adoption)."""
        self.driver.watch(self.ops.spec(row), row.driver_state)

    async def orphan_names(self) -> set[str]:
        """Names the driver holds resources for that have no registry row."""
        found = await self.driver.list_names()
        return found - registry.known_names(found)

    async def remove_orphan(self, name: str) -> None:
        async def remove() -> None:
            registry.record_orphan_removed(name)
            await self.driver.destroy(self.ops.spec_for_orphan(name), None)

        await self.runner.run_without_row(Op.DESTROY, name, remove)

    def restartable(self, row: EngineRow) -> bool:
        return self.ops.restartable(row)

    def idle_for(self, row: EngineRow, now: float) -> float:
        return self.ops.idle_for(row, now)

    def api_key(self, row: EngineRow) -> str:
        return self.ops.api_key(row)


async def _unchanged(row: EngineRow) -> EngineRow:
    return row
