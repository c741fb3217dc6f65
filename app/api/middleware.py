"""Pure ASGI middleware: the request id, the raw-path check, and the access log and metrics.

One class rather than three: all three need the same per-request record (`RequestInfo`,
put in the scope as "orch"), and each ASGI layer costs a coroutine and a send wrapper per
request on the hot path.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics, registry
from app.api.errors import classify, error_response
from app.logs import AccessLog


class RequestInfo:
    """What the access log and the metrics learn about one request as it is answered."""

    __slots__ = ("code", "outcome", "product", "request_id", "route", "started", "status",
                 "user_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.route = "unmatched"  # the endpoint's path pattern: user ids never become labels
        self.product: str | None = None
        self.user_id: str | None = None
        self.code: str | None = None  # the error code, when the answer is an error
        self.outcome: str | None = None  # admit: "admitted" or "denied"
        self.status = 500
        self.started = False  # the answer's head is sent: too late for an error answer


_ids = itertools.count(1)
_ID_PREFIX = uuid.uuid4().hex[:12]  # unique per process; a counter after it (uuid4 costs more)


def request_id(sent: bytes | None) -> str:
    if sent is not None and len(sent) <= 128:
        text = sent.decode("latin-1")
        if text.isascii() and text.isprintable() and text:
            return text
    return f"{_ID_PREFIX}{next(_ids):012x}"


def raw_path_problem(raw_path: bytes) -> str | None:
    """Why a percent-encoded path cannot be routed honestly: an encoded '/' would move a user
    id's tail into the route, and bytes that are not UTF-8 would be replaced by U+FFFD."""
    if b"%" not in raw_path:
        return None
    if b"%2f" in raw_path.lower():
        return "user_id must not contain '/'"
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return "the path is not UTF-8 once percent-decoded"
    return None


class RequestContext:
    def __init__(self, app: ASGIApp, access_log: AccessLog) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        sent_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                sent_id = value
        info = RequestInfo(request_id(sent_id))
        scope["orch"] = info
        id_header = (b"x-request-id", info.request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                info.status, info.started = message["status"], True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        token = registry.request_id_var.set(info.request_id)
        try:
            problem = raw_path_problem(scope.get("raw_path") or b"")
            if problem is None:
                await self.app(scope, receive, send_with_id)
            else:
                info.code = "INVALID_REQUEST"
                await error_response(400, info.code, problem, info.request_id)(
                    scope, receive, send_with_id)
        except Exception as exc:  # a bug: answered through the same mapping as the rest
            if info.started:
                raise
            status, info.code, message, headers = classify(exc, info.request_id)
            await error_response(status, info.code, message, info.request_id, headers)(
                scope, receive, send_with_id)
        finally:
            registry.request_id_var.reset(token)
            self._account(scope["method"], info, started)

    def _account(self, method: str, info: RequestInfo, started: float) -> None:
        elapsed = time.perf_counter() - started
        code = info.code
        metrics.PER_REQUEST.count(info.route, method, info.status)
        if code in ("RATE_LIMITED", "QUOTA_EXCEEDED"):
            metrics.REFUSALS.labels(code.lower()).inc()
        if info.route == "/engines/{user_id}/admit":
            metrics.PER_REQUEST.observe_admit(code.lower() if code else info.outcome or "admitted",
                                              elapsed)
        self.access_log.request(info.request_id, info.product, info.user_id, method, info.route,
                                info.status, code or "ok", round(elapsed * 1000, 3))


def info_of(scope: MutableMapping[str, Any]) -> RequestInfo:
    info: RequestInfo = scope["orch"]
    return info
