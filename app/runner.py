"""The operations runner: how an operation runs on an engine, whatever its body.

`Engines.run` (app.operations) calls it with each operation's policy from the table. It owns:
- the flight: one operation per engine in this process; a second caller of the same
  operation joins the one in flight and gets its result (app.flights);
- the lease on the engine's row: one operation per engine across replicas; while another
  owner holds it, wait (bounded); once it runs out, take it over;
- finishing or rolling back the operation a dead owner left half-done (`settle`, given by
  app.bodies), before the new operation sees the row;
- timing (orch_operation_seconds) and the operation's log line.
An operation itself is a function from the leased `EngineRow` to its result; every state
change inside it is a registry transition (a compare-and-set plus an audit event).
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
from typing import Any, TypeVar

from app import errors, metrics, registry, states
from app.config import Settings
from app.flights import Flights
from app.registry import EngineRow

log = logging.getLogger("orch.lifecycle")
T = TypeVar("T")
Key = tuple[int, str]  # (product id, user id)
Settle = Callable[[EngineRow], Awaitable[EngineRow | None]]  # None: the row is gone

POLL_S = 0.05


def needs_settling(row: EngineRow) -> bool:
    """With the lease held, a transient state or a key in flight means its operation died."""
    return row.status in states.TRANSIENT or row.pending_key_enc is not None


class Runner:
    def __init__(self, settings: Settings, settle: Settle):
        self.settings = settings
        self.settle = settle
        self.flights = Flights()
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def run(self, op: str, key: Key, body: Callable[[EngineRow], Awaitable[T]], *,
                  handles: frozenset[str] = frozenset(), settle: bool = True,
                  wait: bool = True, flight: str | None = None) -> T:
        """Run `body` on the engine `key` under the flight and the lease. A transient state
        the operation does not handle itself (`handles`) is settled first. Without `wait`,
        an engine leased elsewhere raises Busy at once. `flight` names what joins: by default
        the operation; an operation with an argument (upgrade's version) adds it, so that
        only callers asking for the same thing share one run."""
        async def leased() -> T:
            row = registry.find_engine(*key)
            if row is None:
                raise errors.engine_not_found(key[1])
            async with self.lease(row, wait) as held:
                if settle and needs_settling(held) and held.status not in handles:
                    settled = await self.settle(held)
                    if settled is None:
                        raise errors.engine_not_found(key[1])
                    held = settled
                return await body(held)

        if not wait and self.flights.current(key):
            raise errors.busy(key[1])  # another operation here has it: not worth queueing
        return await self.flights.run(key, flight or op, lambda: self._timed(op, key, leased))

    async def create(self, op: str, key: Key, insert: Callable[[], EngineRow],
                     body: Callable[[EngineRow], Awaitable[T]],
                     claim: Callable[[], Awaitable[T | None]] | None = None) -> T:
        """Provision: insert the row (leased to us from the start), then run `body` on it. A
        row left `destroying` by a dead owner is finished first: its lease is taken over
        when it runs out, its destroy completed, then the new row inserted. `claim`, when
        given, is tried first, in the same flight: what it returns (not None) is the answer."""
        async def leased() -> T:
            existing = registry.find_engine(*key)
            if existing is not None:
                if existing.status != states.DESTROYING:
                    raise errors.already_exists(key[1])
                try:
                    async with self.lease(existing, wait=True) as held:
                        if await self.settle(held) is not None:
                            raise errors.already_exists(key[1])
                except errors.EngineNotFound:
                    pass  # gone meanwhile: what we wanted
            if claim is not None and (claimed := await claim()) is not None:
                return claimed
            row = insert()
            async with self._renewing(row):
                return await body(row)

        return await self.flights.run(key, op, lambda: self._timed(op, key, leased))

    async def run_without_row(self, op: str, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """For driver resources no row owns (orphans): the flight and the timing, no lease."""
        key = (0, name)  # no product has id 0
        return await self.flights.run(key, op, lambda: self._timed(op, key, fn))

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout`) for every operation in flight here: at shutdown, say."""
        pending = self.flights.all()
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    # ---- leases ------------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, row: EngineRow, wait: bool = True) -> AsyncIterator[EngineRow]:
        """Hold the row's lease (waiting while another owner holds it), then re-read it."""
        deadline = time.monotonic() + (self.lease_wait() if wait else 0.0)
        while not registry.acquire_lease(row, self.owner, self.settings.lease_s):
            if registry.reload(row) is None:
                raise errors.engine_not_found(row.user_id)
            if time.monotonic() >= deadline:
                raise errors.busy(row.user_id)
            await asyncio.sleep(POLL_S)
        fresh = registry.reload(row)
        if fresh is None:
            raise errors.engine_not_found(row.user_id)
        async with self._renewing(fresh):
            yield fresh

    def holding(self, row: EngineRow) -> Any:
        """Keep renewing the lease of a row taken leased (a claim), and give it back after."""
        return self._renewing(row)

    @asynccontextmanager
    async def _renewing(self, row: EngineRow) -> AsyncIterator[None]:
        async def renew() -> None:
            while True:
                await asyncio.sleep(self.settings.lease_s / 3)
                registry.acquire_lease(row, self.owner, self.settings.lease_s)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            registry.release_lease(row, self.owner)

    def lease_wait(self) -> float:
        """How long to wait for another owner: its operation's longest run, plus a lease
        period for it to run out if that owner died."""
        return self.settings.boot_timeout_s + self.settings.stop_grace_s + 2 * self.settings.lease_s

    # ---- timing --------------------------------------------------------------------------------

    async def _timed(self, op: str, key: Key, fn: Callable[[], Awaitable[T]]) -> T:
        """Timed once per real run (joiners share it)."""
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

