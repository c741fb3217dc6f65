"""The CLI's one way into the operations: build the services the API's handlers get, run one
handler (the same function the endpoint runs), close them.

A command and its endpoint therefore share the operation, its checks and its errors; the exit
status follows from the error's code through the API's status table (`exit_status`). The
services are built once per command, in this process: an operation run here holds the same
engine lease as one run by a server, so the two never work on one engine at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import msgspec

from app import errors, products, registry, statedir, states
from app.config import Settings
from app.operations import Engines, Op, ProductRef
from app.registry import EngineRow

T = TypeVar("T")

# Exit statuses of every `orch` command (README, "Command line").
OK, REFUSED, USAGE, NO_DATABASE, NOT_FOUND, UNAVAILABLE = 0, 1, 2, 3, 4, 5
DOWN_AT_ONCE = 16  # engines `down` stops at the same time: each waits up to the stop grace


def connect(settings: Settings, create: bool = False) -> None:
    """Open the database the settings name (with create=False it must exist: NoDatabase)."""
    statedir.prepare(settings, create)
    registry.connect(settings.database_url, settings.db_timeout_s)


def product_ref(name: str) -> ProductRef:
    """The product as the API's handlers see it once its platform key is checked."""
    product = products.get(name)
    return ProductRef(product.id, product.name, product.max_engines, product.rate_limit_rpm)


def product_of_rollout(rollout_id: int) -> ProductRef:
    rollout = registry.rollouts.reload_rollout(rollout_id)
    if rollout is None:
        raise errors.NotFound(f"no rollout {rollout_id}")
    return product_ref(registry.product_name(rollout.product_id))


def body(endpoint: str, fields: dict[str, Any]) -> Any:
    """The endpoint's body from the command's options, checked by the API's own checks."""
    from app.api.spec import BY_NAME
    from app.api.validate import Checks

    given = {k: v for k, v in fields.items() if v is not None}
    return Checks(BY_NAME[endpoint]).body(json.dumps(given).encode())


def run(settings: Settings, endpoint: str, product: str | None, user_id: str = "",
        request: Any = None, rollout_id: int = 0, query: Any = None) -> Any:
    """Run the handler of `endpoint` as the API would, for the product named (None: the
    rollout's own); its answer as JSON-ready builtins."""
    from app.api import handlers, rollouts
    from app.api.handlers import Call

    handler = {**handlers.HANDLERS, **rollouts.HANDLERS}[endpoint]

    async def once(svc: Any) -> Any:
        ref = product_ref(product) if product is not None else product_of_rollout(rollout_id)
        return await handler(svc, Call(ref, user_id, request, query, rollout_id))

    return msgspec.to_builtins(with_services(settings, once))


def with_services(settings: Settings, use: Callable[[Any], Awaitable[T]]) -> T:
    """`use(services)` on the services the server builds at start-up (app/api/app.py), with
    the database open. A driver setting that is wrong is a usage error before the database
    is looked for."""
    from app.admit import Admitter
    from app.api.handlers import Services
    from app.crypto import load_keybox
    from app.drivers import make_driver

    driver = make_driver(settings, registry.ports)
    connect(settings)

    async def once() -> T:
        engines = Engines(settings, driver, load_keybox(settings))
        try:
            return await use(Services(engines, Admitter(engines)))
        finally:
            await engines.close()
            await engines.driver.close()

    return asyncio.run(once())


def reconcile(settings: Settings) -> dict[str, int]:
    from app.reconciler import Reconciler

    async def once(svc: Any) -> dict[str, int]:
        return await Reconciler(svc.engines).pass_once(wait=True)

    return with_services(settings, once)


def down(settings: Settings) -> list[dict[str, Any]]:
    """Every engine's process ended, brain kept: running and sleeping engines are left
    sleeping, so the next admit with auto_wake brings each back (app/CONTRACT.md, "Down").
    One result per engine: its state before and after, or the error that stopped it."""
    async def all_down(svc: Any) -> list[dict[str, Any]]:
        engines: Engines = svc.engines
        gate = asyncio.Semaphore(DOWN_AT_ONCE)

        async def one(row: EngineRow) -> dict[str, Any]:
            shown = {"product": engines.bodies.product_name(row.product_id), "user_id": row.user_id,
                     "was": row.status}
            async with gate:
                try:
                    after = await engines.run(Op.DOWN, row.key)
                except errors.EngineNotFound:
                    return {**shown, "status": None}  # destroyed meanwhile, or its destroy settled
                except errors.DomainError as exc:
                    return {**shown, "status": row.status, "error": f"{exc.code}: {exc.message}"}
            return {**shown, "status": after.status}

        rows = registry.list_engines(limit=1_000_000)
        return list(await asyncio.gather(*(one(row) for row in rows)))

    return with_services(settings, all_down)


def exit_status(exc: errors.DomainError) -> int:
    """What the exit status says, from the HTTP status the API answers the same error with."""
    from app.api.spec import STATUS_BY_CODE

    http = STATUS_BY_CODE.get(exc.code, 500)
    if http == 404:
        return NOT_FOUND
    if http in (400, 401):
        return USAGE
    return REFUSED if http < 500 else UNAVAILABLE


def live(counts: Iterable[tuple[str, str, int]]) -> dict[str, int]:
    """Engines by state, of the states where an engine may have a process."""
    found: dict[str, int] = {}
    for _product, status, n in counts:
        if status not in (states.STOPPED, states.FAILED):
            found[status] = found.get(status, 0) + n
    return found
