"""The Starlette application: routes from the endpoint table, the request-context middleware,
one exception handler, and the lifespan that starts the registry, the driver and the
background reconciler."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app import crypto, errors, logs, metrics, registry
from app.admit import Admitter
from app.api import docs, openapi
from app.api.auth import Authenticator
from app.api.dispatch import Dispatcher
from app.api.errors import HANDLED, handle
from app.api.handlers import Services
from app.api.middleware import RequestContext, info_of
from app.api.spec import ENDPOINTS, Endpoint
from app.config import Settings
from app.drivers import make_driver
from app.logs import AccessLog
from app.operations import Engines
from app.pool import Refiller
from app.reconciler import Reconciler
from app.rollouts import RolloutRunner
from app.snapshots.schedule import SnapshotSchedule


class OrchestratorApp:
    """Holds what the lifespan makes (services, background tasks); `.app` is the Starlette."""

    def __init__(self, settings: Settings, run_reconciler: bool = True):
        self.settings = settings
        self.run_reconciler = run_reconciler
        self.auth = Authenticator()
        self.access_log = AccessLog(settings.log_level)
        self.services: Services | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._openapi = orjson.dumps(openapi.document())
        self.app = Starlette(
            routes=self._routes(),
            middleware=[Middleware(RequestContext, access_log=self.access_log)],
            # Errors the code raises on purpose; anything else (a bug) is answered by
            # RequestContext through the same mapping (Starlette's Exception handler would
            # run outside the middleware, and re-raise).
            exception_handlers=dict.fromkeys(HANDLED, handle),
            lifespan=self._lifespan,
        )
        # "/engines/" is no route: a 404 in the error shape, not a redirect to "/engines".
        self.app.router.redirect_slashes = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # ---- lifespan ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        registry.connect(self.settings.database_url, self.settings.db_timeout_s)
        subscribe_observers()
        driver = make_driver(self.settings, registry.ports)
        engines = Engines(self.settings, driver, crypto.load_keybox(self.settings))
        self.services = Services(engines, Admitter(engines))
        if self.run_reconciler:
            reconciler = Reconciler(engines)
            self._tasks.append(asyncio.create_task(reconciler.run_forever()))
            snapshots = SnapshotSchedule(engines, reconciler.mine)
            self._tasks.append(asyncio.create_task(snapshots.run_forever()))
            self._tasks.append(asyncio.create_task(RolloutRunner(engines).run_forever()))
            self._tasks.append(asyncio.create_task(Refiller(engines).run_forever()))

    async def shutdown(self) -> None:
        # Engines keep running: an orchestrator restart adopts them.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.access_log.close()
        if self.services:
            await self.services.engines.close()
            await self.services.engines.driver.close()
        registry.db.close()

    def _services(self) -> Services:
        assert self.services is not None, "requests are served after startup"
        return self.services

    # ---- routes --------------------------------------------------------------------------

    def _routes(self) -> list[BaseRoute]:
        plain: dict[str, Callable[[Request], Any]] = {
            "healthz": self.healthz, "readyz": self.readyz, "metrics": self.metrics,
            "openapi": self.openapi}
        by_path: dict[str, list[Endpoint]] = {}
        for endpoint in ENDPOINTS:
            by_path.setdefault(endpoint.path, []).append(endpoint)
        routes: list[BaseRoute] = []
        for path, endpoints in by_path.items():
            if endpoints[0].auth:
                dispatcher = Dispatcher(endpoints, self.auth, self._services)
                routes.append(Route(path, dispatcher, methods=[e.method for e in endpoints]))
            else:
                (endpoint,) = endpoints
                routes.append(Route(path, _labelled(path, plain[endpoint.name]), methods=["GET"]))
        return [*routes, *docs.routes()]

    async def healthz(self, _request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        try:
            registry.db.execute_sql("SELECT 1")
            await self._services().engines.driver.ping()
        except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
            return _json({"status": "unavailable", "reason": str(exc)[:200]}, 503)
        return _json({"status": "ready"})

    async def metrics(self, request: Request) -> Response:
        token = self.settings.metrics_token
        if token is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                raise errors.Unauthorized("/metrics needs Authorization: Bearer <ORCH_METRICS_TOKEN>")
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, _request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")


def subscribe_observers() -> None:
    """Who hears of every state change: the one place subscriptions are made."""
    registry.subscribe(metrics.count_transition)
    registry.subscribe(logs.log_transition)


def _labelled(path: str, endpoint: Callable[[Request], Any]) -> Callable[[Request], Any]:
    async def labelled(request: Request) -> Any:
        info_of(request.scope).route = path
        return await endpoint(request)

    return labelled


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def create_app(settings: Settings | None = None) -> OrchestratorApp:
    return OrchestratorApp(settings or Settings.from_env())
