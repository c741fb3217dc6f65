"""The operations on an engine, in one table, and the one way to run one.

`TABLE` declares each operation once: its name, its body (app.bodies: what it does to the
leased row) and its policy (how it runs). `Engines.run(op, key, **args)` reads the policy and
hands the body to the runner (app.runner: the flight, the lease, settling what a dead owner
left, the timing); every state change inside a body is a registry transition (a
compare-and-set plus its audit event). The API's handlers, admit, the reconciler, rollouts
and the CLI all call `Engines.run`; nothing else runs an operation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any

from app import crypto, engine_http, errors, metrics, naming, registry, states
from app.bodies import Bodies
from app.config import Settings
from app.crypto import KeyBox
from app.drivers.base import Driver
from app.registry import EngineRow
from app.runner import Key, Runner
from app.snapshots.service import Manifest

POLL_S = 0.05


@dataclass(frozen=True)
class ProductRef:
    id: int
    name: str
    max_engines: int
    rate_limit_rpm: int


class Op(StrEnum):
    PROVISION = "provision"
    START = "start"
    STOP = "stop"
    ROTATE = "rotate"
    UPGRADE = "upgrade"
    DESTROY = "destroy"
    WAKE = "wake"
    RESTART = "restart"
    SLEEP = "sleep"
    DOWN = "down"
    FAIL = "fail"
    RESET_RESTARTS = "reset_restarts"
    RECOVER = "recover"
    REMOVE_ORPHAN = "remove_orphan"
    SNAPSHOT = "snapshot"
    RESTORE = "restore"
    IMPORT_BRAIN = "import_brain"
    CLAIM = "claim"
    RESTORE_ELSEWHERE = "restore_elsewhere"
    TIDY = "tidy"


@dataclass(frozen=True)
class Policy:
    """How an operation runs. By default: on an existing row, leased (waiting, bounded, for
    another owner), after settling any transient state a dead owner left."""

    handles: frozenset[str] = frozenset()  # transient states the body finishes itself
    settle: bool = True  # False: the body applies from every state, half-done ones included
    wait: bool = True  # False: an engine held elsewhere answers Busy at once
    flight_arg: str | None = None  # the argument that is part of the flight key
    version_arg: str | None = None  # the argument the driver must be able to run
    busy: Callable[[str], errors.DomainError] | None = None  # the answer to Busy, if not Busy
    creates: bool = False  # inserts the row (under its lease) rather than finding it
    row: bool = True  # False: driver resources that no row owns (the key's user is a name)


@dataclass(frozen=True)
class Operation:
    op: Op
    body: Callable[..., Awaitable[Any]]  # a Bodies method: (bodies, row or name, **args)
    policy: Policy = Policy()


TABLE: dict[Op, Operation] = {o.op: o for o in [
    Operation(Op.PROVISION, Bodies.provision, Policy(creates=True, version_arg="engine_version")),
    Operation(Op.START, Bodies.start),
    # A stop that died half-way is finished by the next stop rather than settled first.
    Operation(Op.STOP, Bodies.stop, Policy(handles=frozenset({states.STOPPING}))),
    Operation(Op.ROTATE, Bodies.rotate_key),
    # Only callers asking for the same version share a run; the spec answers an upgrade
    # held off past the wait with a 409.
    Operation(Op.UPGRADE, Bodies.upgrade, Policy(flight_arg="version", version_arg="version",
                                                 busy=errors.engine_busy)),
    Operation(Op.DESTROY, Bodies.destroy, Policy(settle=False)),
    Operation(Op.WAKE, Bodies.wake),
    Operation(Op.RESTART, Bodies.restart),
    Operation(Op.SLEEP, Bodies.sleep, Policy(wait=False)),
    # `orch down`: waits like a stop, since the server it follows may still hold a lease.
    Operation(Op.DOWN, Bodies.down),
    Operation(Op.FAIL, Bodies.fail),
    # Never waits: an operation holding the row decides its restart count itself.
    Operation(Op.RESET_RESTARTS, Bodies.reset_restarts, Policy(wait=False)),
    Operation(Op.RECOVER, Bodies.recover),  # the settling before it is the whole work
    Operation(Op.REMOVE_ORPHAN, Bodies.remove_orphan, Policy(row=False)),
    # A scheduled snapshot may skip an unchanged brain: it is not the same run as one asked for.
    Operation(Op.SNAPSHOT, Bodies.snapshot, Policy(flight_arg="scheduled")),
    Operation(Op.RESTORE, Bodies.restore, Policy(flight_arg="snapshot_id")),
    # Each upload is its own run (`upload` is a fresh id): two uploads never share a result.
    Operation(Op.IMPORT_BRAIN, Bodies.import_brain, Policy(flight_arg="upload")),
    # Runs inside a new user's provision, in its flight: a warm pool's engine taken in one
    # compare-and-set (app.registry.pool.claim) comes leased; the body tells it its user.
    Operation(Op.CLAIM, Bodies.claim, Policy(creates=True)),
    # The reconciler's: an engine held by another operation is looked at next time.
    Operation(Op.RESTORE_ELSEWHERE, Bodies.restore_elsewhere, Policy(wait=False)),
    Operation(Op.TIDY, Bodies.tidy, Policy(wait=False)),
]}


class Engines:
    """What a process needs to run operations: the driver, the keys, the runner."""

    def __init__(self, settings: Settings, driver: Driver, keys: KeyBox):
        self.settings = settings
        self.driver = driver
        self.keys = keys
        self.http = engine_http.client()
        self.bodies = Bodies(settings, driver, keys, self.http)
        self.runner = Runner(settings, self.bodies.settle)

    async def close(self) -> None:
        await self.http.aclose()
        await self.bodies.pool_http.aclose()

    async def run(self, op: Op, key: Key, **args: Any) -> Any:
        """Run operation `op` on the engine `key` (product id, user id) as TABLE says."""
        operation = TABLE[op]
        policy = operation.policy
        if policy.creates:
            return await self._create(key, **args)
        if policy.version_arg is not None:
            self.driver.check_version(args[policy.version_arg])  # refused before anything runs
        if not policy.row:
            name = key[1]
            return await self.runner.run_without_row(op, name, partial(operation.body, self.bodies, name))
        body = partial(operation.body, self.bodies, **args)
        flight = op if policy.flight_arg is None else f"{op}:{args[policy.flight_arg]}"
        try:
            return await self.runner.run(op, key, body, handles=policy.handles,
                                         settle=policy.settle, wait=policy.wait, flight=flight)
        except errors.Busy:
            if policy.busy is None:
                raise
            raise policy.busy(key[1]) from None

    async def _create(self, key: Key, product_name: str, engine_version: str | None = None,
                      in_pool: bool = False,
                      seed: tuple[str, Manifest] | None = None) -> tuple[EngineRow, str]:
        product_id, user_id = key
        version = engine_version or self.default_version(product_id)
        self.driver.check_version(version)  # the driver refuses what it cannot run (SPEC "Additions")
        self.bodies.remember_product(product_id, product_name)
        api_key = crypto.new_engine_key()

        def insert() -> EngineRow:
            return registry.insert_engine(product_id, user_id, naming.engine_name(product_name, user_id),
                                          version, self.keys.encrypt(api_key), self.runner.owner,
                                          self.settings.lease_s, in_pool)

        body = partial(TABLE[Op.PROVISION].body, self.bodies, api_key=api_key, seed=seed)
        # A brain from a snapshot is a new brain: a pooled engine, with one of its own, is not.
        claim = None if in_pool or seed else partial(self._claim, key, version)
        return await self.runner.create(Op.PROVISION, key, insert, body, claim)

    def default_version(self, product_id: int) -> str:
        """What a provision without `engine_version` gets, so what the warm pool runs: the
        target of a rollout of the product's whole fleet, else the configured image."""
        return registry.pool.fleet_version(product_id) or self.settings.engine_image

    async def _claim(self, key: Key, version: str) -> tuple[EngineRow, str] | None:
        """A ready engine of the product's warm pool, made the user's; None: none to take.
        At the quota with pooled engines still booting, one of them is waited for, so that
        the pool never makes a new user's provision fail."""
        product_id, user_id = key
        deadline = time.monotonic() + self.settings.boot_timeout_s
        while True:
            taken = registry.pool.claim(product_id, user_id, version, self.runner.owner,
                                        self.settings.lease_s)
            if taken is not None:
                row, was = taken
                async with self.runner.holding(row):
                    claimed: tuple[EngineRow, str] | None = \
                        await TABLE[Op.CLAIM].body(self.bodies, row, was)
                if claimed is not None:
                    metrics.POOL_CLAIMS.labels(self.bodies.product_name(product_id)).inc()
                    return claimed
                continue  # that one was broken (and is gone): another, or a cold provision
            if time.monotonic() >= deadline or not registry.pool.booting_at_quota(product_id, version):
                if registry.pool.target(product_id) > 0:
                    metrics.POOL_MISSES.labels(self.bodies.product_name(product_id)).inc()
                return None
            await asyncio.sleep(POLL_S)

    async def wait_for(self, row: EngineRow, timeout: float) -> None:
        """Wait (at most `timeout`) for the operation in flight on `row`, here or on another
        replica; take over a dead owner's. A failed boot is re-raised: it is the waiter's
        failure too. Another caller's refusal (a 409 to a /start) is not."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            flights = self.runner.flights.current(row.key)
            if flights:
                done, _ = await asyncio.wait(flights, timeout=remaining)
                for future in done:
                    error = None if future.cancelled() else future.exception()
                    if isinstance(error, errors.DriverError):
                        raise error
                return
            fresh = registry.reload(row)
            if fresh is None or fresh.status not in (states.PROVISIONING, states.STARTING):
                return
            if fresh.lease_until is None or fresh.lease_until < time.time():
                await self.run(Op.RECOVER, row.key)  # its owner died
                return
            await asyncio.sleep(POLL_S)
