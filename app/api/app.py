"""The ASGI application: request ids, routing on the raw path, errors, and the lifespan that
starts the registry, the driver and the background reconciler.

Routing uses the raw path so that a percent-encoded user id (`a%2Fb`) is one segment, decoded
and then refused for its '/', rather than silently becoming another route.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from app import crypto, errors, metrics, naming, registry
from app.admit import Admitter
from app.api import openapi
from app.api.auth import Authenticator
from app.api.errors import error_body, method_not_allowed, not_found, to_api_error
from app.api.request import Request
from app.api.routes import Services, match
from app.config import Settings
from app.drivers import make_driver
from app.lifecycle import Lifecycle
from app.logs import AccessLog
from app.reconciler import Reconciler

log = logging.getLogger("orch.api")

PLAIN_ROUTES = {b"/openapi.json", b"/metrics", b"/healthz", b"/readyz"}

JSON_HEADERS = [(b"content-type", b"application/json")]


class OrchestratorApp:
    def __init__(self, settings: Settings, run_reconciler: bool = True):
        self.settings = settings
        self.run_reconciler = run_reconciler
        self.auth = Authenticator()
        self.access_log = AccessLog(settings.log_level)
        self.services: Services | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._openapi = json.dumps(openapi.document()).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    # ---- lifespan ----------------------------------------------------------------------------

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # uvicorn prints this and exits
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        registry.connect(self.settings.database_url, self.settings.db_timeout_s)
        lifecycle = Lifecycle(self.settings, make_driver(self.settings), crypto.load_keybox(self.settings))
        self.services = Services(lifecycle, Admitter(lifecycle))
        self._tasks.append(asyncio.create_task(self._flush_access_log()))
        if self.run_reconciler:
            self._tasks.append(asyncio.create_task(Reconciler(lifecycle).run_forever()))

    async def _flush_access_log(self) -> None:
        while True:
            await asyncio.sleep(self.access_log.FLUSH_S)
            self.access_log.flush()

    async def shutdown(self) -> None:
        # Engines keep running: an orchestrator restart adopts them.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.access_log.flush()
        if self.services:
            await self.services.lifecycle.close()
            await self.services.lifecycle.driver.close()
        registry.db.close()

    # ---- requests ---------------------------------------------------------------------------

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = time.perf_counter()
        request = Request(scope, receive)
        request_id = _request_id(request.request_id)
        token = registry.request_id_var.set(request_id)
        headers = [*JSON_HEADERS, (b"x-request-id", request_id.encode())]
        ctx: dict[str, Any] = {"route": "unmatched"}
        code = None
        try:
            status, body = await self._dispatch(scope, request, ctx)
            payload = body if isinstance(body, bytes) else orjson.dumps(body)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            error = to_api_error(exc, request_id)
            status, code = error.status, error.code
            payload = error_body(error.status, error.code, error.message, request_id)
            headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        finally:
            registry.request_id_var.reset(token)
        if ctx["route"] == "/metrics":
            headers[0] = (b"content-type", CONTENT_TYPE_LATEST.encode())
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        self._account(scope["method"], ctx, status, code, request_id, started)

    def _account(self, method: str, ctx: dict[str, Any], status: int, code: str | None,
                 request_id: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = ctx["route"]
        metrics.PER_REQUEST.count(route, method, status)
        if code in ("RATE_LIMITED", "QUOTA_EXCEEDED"):
            metrics.REFUSALS.labels(code.lower()).inc()
        if route.endswith("/admit"):
            outcome = code.lower() if code else ctx.get("outcome", "admitted")
            metrics.PER_REQUEST.observe_admit(outcome, elapsed)
        self.access_log.request(request_id, ctx.get("product"), ctx.get("user_id"), method, route,
                                status, code or "ok", round(elapsed * 1000, 3))

    async def _dispatch(self, scope: dict[str, Any], request: Request,
                        ctx: dict[str, Any]) -> tuple[int, Any]:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw_path.split(b"?", 1)[0]
        method = scope["method"]
        if raw_path in PLAIN_ROUTES and method in ("GET", "HEAD"):
            ctx["route"] = raw_path.decode()
            return await self._plain(raw_path)
        segments = raw_path.split(b"/")[1:]
        text = [s.decode("latin-1") for s in segments]
        handlers, users, labels = match(text)
        if not handlers:
            raise not_found()
        handler = handlers.get(method)
        if handler is None:
            ctx["route"] = next(iter(labels.values()))
            raise method_not_allowed(list(handlers))
        ctx["route"], user_segment = labels[method], users[method]
        product = self.auth.product(request.platform_key)
        ctx["product"] = product.name
        user_id = _decode_user_id(user_segment) if user_segment is not None else None
        ctx["user_id"] = user_id
        assert self.services is not None
        status, body = await handler(self.services, request, product, user_id)
        if isinstance(body, dict) and body.get("admitted") is False:
            ctx["outcome"] = "denied"
        return status, body

    async def _plain(self, path: bytes) -> tuple[int, Any]:
        if path == b"/openapi.json":
            return 200, self._openapi
        if path == b"/metrics":
            return 200, metrics.exposition()
        return await self._health(path == b"/readyz")

    async def _health(self, ready: bool) -> tuple[int, Any]:
        if not ready:
            return 200, {"status": "ok"}
        try:
            registry.db.execute_sql("SELECT 1")
            assert self.services is not None
            await self.services.lifecycle.driver.ping()
        except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
            return 503, {"status": "unavailable", "reason": str(exc)[:200]}
        return 200, {"status": "ready"}


_ids = itertools.count(1)
_ID_PREFIX = uuid.uuid4().hex[:12]  # unique per process; a counter after it (uuid4 costs more)


def _request_id(sent: str | None) -> str:
    if sent and len(sent) <= 128 and sent.isprintable() and sent.isascii():
        return sent
    return f"{_ID_PREFIX}{next(_ids):012x}"


def _decode_user_id(segment: str) -> str:
    if "%" in segment or not segment.isascii():
        try:
            user_id = unquote_to_bytes(segment.encode("latin-1")).decode("utf-8")
        except UnicodeDecodeError:
            raise errors.invalid("user_id must be UTF-8") from None
    else:
        user_id = segment  # nothing to unquote, and ASCII is the same in latin-1 and UTF-8
    problem = naming.user_id_problem(user_id)
    if problem:
        raise errors.invalid(problem)
    return user_id


def create_app(settings: Settings | None = None) -> OrchestratorApp:
    return OrchestratorApp(settings or Settings.from_env())
