"""Pure ASGI middleware: the request id, the raw-path check, and the access log and metrics.

One class rather than three: all three need the same per-request record (`RequestInfo`,
put in the scope as "orch"), and each ASGI layer costs a coroutine and a send wrapper per
request on the hot path.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import MutableMapping
from time import perf_counter
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.errors import classify, error_response
from app.logs import AccessLog
from app.registry import request_id_var

log = logging.getLogger("orch.api")


class RequestInfo:
    """What the access log and the metrics learn about one request as it is answered, and
    the headers the operations read (picked in the same pass as the request id)."""

    __slots__ = ("code", "id_header", "key", "keys", "length", "method", "outcome", "product",
                 "request_id", "route", "send", "started", "status", "user_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.route = "unmatched"  # the endpoint's path pattern: user ids never become labels
        self.method = "GET"
        self.product: str | None = None
        self.user_id: str | None = None
        self.code: str | None = None  # the error code, when the answer is an error
        self.outcome: str | None = None  # admit: "admitted" or "denied"
        self.status = 500
        self.started = False  # the answer's head is sent: too late for an error answer
        self.key: bytes | None = None  # X-Platform-Key (the last one)
        self.keys = 0  # how many X-Platform-Key headers came (a second is refused)
        self.length: bytes | None = None  # Content-Length
        self.id_header = (b"x-request-id", b"")  # the response header, set by RequestContext
        self.send: Send | None = None  # the server's send, wrapped by send_with_id

    async def send_with_id(self, message: Message) -> None:
        """The send the application gets: records the status, adds X-Request-ID. Operations
        (admit's path) sends its head with the header already, marked started."""
        if not self.started and message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
            message["headers"] = [*message.get("headers", ()), self.id_header]
        assert self.send is not None
        await self.send(message)


# Unique per process, then a counter (uuid4 costs more); the counter starts at 10**12 so that
# every id has the same length (25), and is written in decimal (str() is cheaper than "%x").
_ids = itertools.count(10**12)
_ID_PREFIX = uuid.uuid4().hex[:12]


def new_request_id() -> str:
    return _ID_PREFIX + str(next(_ids))


def request_id(sent: bytes | None) -> str:
    if sent is not None and len(sent) <= 128:
        text = sent.decode("latin-1")
        if text.isascii() and text.isprintable() and text:
            return text
    return _ID_PREFIX + str(next(_ids))


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
    """Every HTTP request: its id (X-Request-ID, sent back), the raw-path check, the answer to
    an unexpected exception, and its record for the access log and the metrics. Records are
    only queued here; `settle` turns them into metrics and log lines in batches (AccessLog)."""

    def __init__(self, app: ASGIApp, access_log: AccessLog) -> None:
        self.app = app
        self.access_log = access_log
        self._answered = access_log.record
        access_log.settle_with(self.settle)
        metrics.PER_REQUEST.sources.add(access_log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        sent_id = key = length = None
        keys = 0
        for name, value in scope["headers"]:  # one pass for every header the API reads
            if name == b"x-platform-key":
                key = value
                keys += 1
            elif name == b"content-length":
                length = value
            elif name == b"x-request-id":
                sent_id = value
        # Our own id unless the client sent one (request_id() checks it); inline: the usual case.
        info = RequestInfo(_ID_PREFIX + str(next(_ids)) if sent_id is None else request_id(sent_id))
        info.method, info.key, info.keys, info.length = scope["method"], key, keys, length
        scope["orch"] = info
        info.id_header = (b"x-request-id", info.request_id.encode())
        info.send = send
        send_with_id = info.send_with_id  # a bound method: cheaper than a closure per request

        token = request_id_var.set(info.request_id)
        try:
            raw_path = scope.get("raw_path")
            # Only a percent-encoded path can have a problem (the check inline: the usual case).
            problem = None if raw_path is None or b"%" not in raw_path else raw_path_problem(raw_path)
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
            request_id_var.reset(token)
            info.send = None  # the scope holds info and the server's send holds the scope
            finished = perf_counter()
            # A tuple of plain values, not the record object: the collector stops tracking
            # it, so the records waiting for the flush add nothing to its passes.
            self._answered((info.request_id, info.product, info.user_id, info.method,
                            info.route, info.status, info.code, info.outcome,
                            finished - started, finished))

    def settle(self, records: list[Answered]) -> None:
        """Answered requests into the metrics and the access log (AccessLog.settle)."""
        per_request, line = metrics.PER_REQUEST, self.access_log.line
        wall = time.time() - perf_counter()  # perf_counter -> wall clock, for the lines' ts
        for (request_id, product, user_id, method, route, status, code, outcome, elapsed,
             finished) in records:
            try:
                per_request.count(route, method, status)
                if code is not None and code in _REFUSALS:
                    metrics.REFUSALS.labels(_REFUSALS[code]).inc()
                if route == _ADMIT:
                    per_request.observe_admit(code.lower() if code else outcome or "admitted",
                                              elapsed)
                line(request_id, product, user_id, method, route, status, code or "ok",
                     elapsed, wall + finished)
            except Exception:  # a bug: it must not stop the flushes, nor lose other records
                log.exception("accounting a request failed")


# What settle() gets of each answered request: request id, product, user id, method, route,
# status, error code, admit outcome, seconds taken, perf_counter() when answered.
Answered = tuple[str, str | None, str | None, str, str, int, str | None, str | None, float,
                 float]
_ADMIT = "/engines/{user_id}/admit"
_REFUSALS = {"RATE_LIMITED": "rate_limited", "QUOTA_EXCEEDED": "quota_exceeded"}


def info_of(scope: MutableMapping[str, Any]) -> RequestInfo:
    info: RequestInfo = scope["orch"]
    return info
