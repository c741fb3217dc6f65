"""In-process set-up for tests of the runner, the Admitter and the Reconciler: a real SQLite
registry in a temp dir (or a fresh PostgreSQL database with ORCH_TEST_DB=postgres), the real
Engines/Admitter/Reconciler, and a FakeDriver."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from cryptography.fernet import Fernet

from app import naming, products, registry, states
from app.admit import Admitter
from app.config import Settings
from app.crypto import KeyBox
from app.operations import Engines, Op, ProductRef
from app.reconciler import Reconciler
from app.registry import EngineRow
from tests.fake_driver import Behaviour, FakeDriver
from tests.harness import OWN_USER, _drop_postgres_database, _fresh_postgres_database

T = TypeVar("T")

# Short enough for fast tests, long enough that a loaded machine does not trip them.
FAST = dict(boot_timeout_s=3.0, stop_grace_s=1.0, lease_s=1.0, idle_sleep_s=0.0,
            restart_backoff_s=0.05, health_grace_s=0.0, max_restarts=2, tick_s=0.05,
            health_interval_s=0.1, resync_s=1.0,
            engine_user=OWN_USER)  # a local driver in process runs engines as us (no temp-dir dance)


class World:
    def __init__(self, tmp_path: Path, behaviour: Behaviour | None = None, **settings: Any):
        self.postgres = os.environ.get("ORCH_TEST_DB") == "postgres"
        url = _fresh_postgres_database() if self.postgres else f"sqlite:///{tmp_path / 'orch.db'}"
        self.settings = Settings(database_url=url, **{**FAST, **settings})
        self.database = registry.connect(self.settings.database_url)
        product, _ = products.create("p", max_engines=10, rate_limit_rpm=6000)
        self.product = ProductRef(product.id, product.name, product.max_engines, product.rate_limit_rpm)
        self.keys = KeyBox(Fernet.generate_key())
        self.driver = FakeDriver(behaviour)
        self.engines = self.new_engines()
        self.admitter = Admitter(self.engines)
        self.reconciler = Reconciler(self.engines)

    def new_engines(self) -> Engines:
        """Another orchestrator process (or a restarted one) on the same database."""
        return Engines(self.settings, self.driver, self.keys)

    def restart(self) -> None:
        self.engines = self.new_engines()
        self.admitter = Admitter(self.engines)
        self.reconciler = Reconciler(self.engines)

    def op(self, op: Op, user_id: str, **args: Any) -> Coroutine[Any, Any, Any]:
        """Operation `op` on the engine of `user_id` of this world's product."""
        if op is Op.PROVISION:
            args.setdefault("product_name", self.product.name)
        return self.engines.run(op, (self.product.id, user_id), **args)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(self._closing(coro))

    async def _closing(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return await coro
        finally:
            # As a server would: operations its callers stopped waiting for run to their end.
            await self.engines.runner.drain(10.0)
            await self.engines.close()

    def close(self) -> None:
        self.database.close()
        if self.postgres:
            _drop_postgres_database(self.settings.database_url)

    # ---- rows ----------------------------------------------------------------------------

    def row(self, user_id: str) -> EngineRow | None:
        return registry.find_engine(self.product.id, user_id)

    def status(self, user_id: str) -> str | None:
        row = self.row(user_id)
        return row.status if row else None

    def trail(self, user_id: str) -> list[tuple[str, str | None, str | None]]:
        """The audit trail, oldest first: (event, from, to)."""
        return [(e.event, e.from_status, e.to_status)
                for e in reversed(registry.events_for(self.product.id, user_id))]

    def assert_valid_trail(self, user_id: str) -> None:
        """Every audit trail is a walk along the state table (each incarnation of the row:
        from nothing, to the row's deletion)."""
        walk: list[str | None] = [None]
        for event, src, dst in self.trail(user_id):
            if src == dst:
                continue  # not a state change (rotate_key, ...)
            assert src == walk[-1], f"{event}: from {src}, but the engine was {walk[-1]}"
            if dst is None:  # the row is gone: this incarnation ends
                assert states.is_valid_path(walk), walk
                walk = [None]
            else:
                walk.append(dst)
        assert states.is_valid_path(walk), walk

    def set(self, user_id: str, **fields: Any) -> None:
        """Change columns behind the registry's back (to stage a scenario; no row_version bump)."""
        registry.Engine.update(**fields).where(
            (registry.Engine.product == self.product.id) & (registry.Engine.user_id == user_id)).execute()

    def left_by_dead_owner(self, user_id: str, event: str, lease_s: float | None = None,
                           **fields: Any) -> EngineRow:
        """A row as an orchestrator killed mid-operation leaves it: moved by `event` (a real
        transition, with its audit event), still leased to an owner that will never renew nor
        release it; the lease runs out after `lease_s` (default: one lease period)."""
        row = self.row(user_id)
        if row is None:
            row = registry.insert_engine(self.product.id, user_id,
                                         naming.engine_name(self.product.name, user_id), "v1",
                                         self.keys.encrypt("eng_" + "k" * 40), "dead-owner", 60)
        else:
            row = registry.transition(row, event, event, **fields)
        until = time.time() + (self.settings.lease_s if lease_s is None else lease_s)
        self.set(user_id, lease_owner="dead-owner", lease_until=until)
        fresh = self.row(user_id)
        assert fresh is not None
        return fresh


def lease_free(row: EngineRow | None) -> bool:
    return row is not None and (row.lease_owner is None or (row.lease_until or 0) < time.time())


__all__ = ["Behaviour", "World", "lease_free", "replace"]
