"""The HTTP edge: uvicorn's httptools protocol, held to the API's contract below the application.

uvicorn parses HTTP well (llhttp) but, left alone, a client with no key can hold a connection
slot forever with a body that never ends, a refusal from the parser or the concurrency limit is
`text/plain` without an X-Request-ID, a malformed request pipelined after valid ones is answered
before them (their answers are lost), and a streamed answer to an HTTP/1.0 client is chunked.
`GuardedHttpToolsProtocol` subclasses uvicorn's protocol (its `http=` setting takes a protocol
class) rather than writing HTTP again: llhttp still parses, uvicorn's RequestResponseCycle still
answers; this class adds what the contract needs on top:

- time: a request head must be whole within `head_timeout_s` of its first byte (or of the
  connection's opening), on a new connection as on a kept-alive one; a body within
  `body_timeout_s` of its head (408 REQUEST_TIMEOUT when nothing was answered yet; closed in
  any case, also after an early answer such as a 401 sent before the body);
- size: a head over MAX_HEAD bytes is refused with 431 HEADERS_TOO_LARGE;
- HTTP versions other than 1.0 and 1.1 are refused with 505 HTTP_VERSION_NOT_SUPPORTED;
- past `limit_concurrency`, the connection waiting longest on its client (idle, or sending a
  head or body slowly) is closed to make room; only when every connection is the server's own
  work is the new request refused, 503 SERVER_BUSY with Retry-After;
- every refusal is the contract's JSON error with an X-Request-ID, and is written only after
  the answers of the requests pipelined before it (the request it refuses is never run);
- answers (`EdgeCycle`): one Connection header, decided here; an answer of unknown length to
  an HTTP/1.0 client is delimited by closing the connection, not chunked.
"""

from __future__ import annotations

import asyncio
import http
import logging
from typing import Any
from urllib.parse import unquote

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app import errors, metrics
from app.api.middleware import new_request_id, request_id
from app.api.spec import STATUS_BY_CODE

MAX_HEAD = 64 * 1024
# Refusals are rare and run no route, so they are logged one by one (not through the access
# log's batches), with the request line's fields where they apply.
_requests_log = logging.getLogger("orch.requests")
_END = b"\r\n\r\n"
_HEAD, _BODY = 0, 1  # what the connection waits for from its client


def error_answer(status: int, code: str, message: str, rid: str,
                 extra: tuple[tuple[bytes, bytes], ...] = (),
                 default_headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A whole HTTP/1.1 answer in the contract's error shape, closing the connection."""
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": rid}})
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
    for name, value in [*(default_headers or ()), *extra]:
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"content-type: application/json\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
                 b"connection: close\r\n\r\n" % (len(body), rid.encode()))
    return b"".join(lines) + body


class _Stop(Exception):
    """Raised from a parser callback to stop parsing: the request was refused."""


class EdgeCycle(RequestResponseCycle):
    """uvicorn's request/response cycle; the protocol alone decides the Connection header."""

    close_delimited = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            message = self._head(message)
        elif self.close_delimited and message["type"] == "http.response.body":
            await self._close_delimited_body(message)
            return
        await super().send(message)

    def _head(self, message: Any) -> Any:
        headers = []
        length = False
        for name, value in message.get("headers", ()):
            lower = name.lower()
            if lower == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
                continue
            length = length or lower == b"content-length"
            headers.append((name, value))
        if (not length and self.scope["http_version"] == "1.0" and self.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)):
            # HTTP/1.0 has no chunked coding: the body ends where the connection does.
            self.close_delimited, self.keep_alive, self.chunked_encoding = True, False, False
        return {**message, "headers": headers}

    async def _close_delimited_body(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.response_complete:
            return
        self.transport.write(message.get("body", b""))
        if not message.get("more_body", False):
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    head_timeout_s = 10.0  # set per server by app.api.server.config (a subclass per setting)
    body_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _HEAD
        self._head_begun = False  # a request head has begun and is not whole yet
        self._head_seen = 0
        self._timer: asyncio.TimerHandle | None = None
        self._since = self.loop.time()  # when the connection began waiting on its client
        self._held: bytes | None = None  # a refusal written once the earlier answers are
        self._stopped = False  # nothing more is read: the connection ends with a refusal

    # ---- the connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm(self.head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        self._unset_keepalive_if_required()
        if self._phase == _HEAD:
            seen = self._head_seen + len(data)
            if seen > MAX_HEAD and not self._head_ends_in_time(data):
                self._refuse(errors.HeadersTooLarge, "the request head is over 64 KiB")
                return
            self._head_seen = seen
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if not self._stopped:
                self._malformed(exc)
            return
        if self._timer is None and (self._phase == _BODY or self._head_begun):
            self._arm(self.body_timeout_s if self._phase == _BODY else self.head_timeout_s)

    def _head_ends_in_time(self, data: bytes) -> bool:
        end = data.find(_END)
        return end >= 0 and self._head_seen + end + len(_END) <= MAX_HEAD

    # ---- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_begun, self._head_seen = False, 0
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self._refuse(errors.HttpVersionNotSupported,
                         f"HTTP/{version} is not served; use HTTP/1.1")
            raise _Stop
        self.scope["method"] = self.parser.get_method().decode("ascii")
        self.scope["http_version"] = version
        parsed = httptools.parse_url(self.url)
        raw_path = parsed.path
        path = raw_path.decode("ascii")  # raw non-ASCII: a malformed request
        if "%" in path:
            path = unquote(path)
        self.scope["path"] = self.root_path + path
        self.scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        self.scope["query_string"] = parsed.query or b""
        if self._over_limit() and not self._make_room():
            self.logger.warning("refusing a request: %s connections, none of them idle",
                                self.limit_concurrency)
            self._refuse(errors.ServerBusy, "the server is at its connection limit; try again",
                         ((b"retry-after", b"1"),))
            raise _Stop
        self._start_cycle(version)
        self._phase, self._since = _BODY, self.loop.time()

    def _start_cycle(self, version: str) -> None:
        earlier = self.cycle
        self.cycle = EdgeCycle(
            scope=self.scope, transport=self.transport, flow=self.flow, logger=self.logger,
            access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=version == "1.1" and self.parser.should_keep_alive(),
            on_response=self.on_response_complete)
        if earlier is None or earlier.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:  # pipelined: run once the answers before it are written
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._phase, self._head_seen, self._since = _HEAD, 0, self.loop.time()

    def on_response_complete(self) -> None:
        if self._held is not None and not self.pipeline:
            self.server_state.total_requests += 1
            self._write_held()
            return
        super().on_response_complete()

    # ---- refusals ----------------------------------------------------------------------------

    def _refuse(self, error: type[errors.DomainError], message: str,
                extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answers `error` and closes, after the answers of the requests before this one."""
        self._stopped = True
        self._disarm()
        sent = None
        if self.headers:
            sent = next((v for n, v in self.headers if n == b"x-request-id"), None)
        rid = new_request_id() if sent is None else request_id(sent)
        status = STATUS_BY_CODE[error.code]
        metrics.EDGE_REFUSALS.labels(error.code).inc()
        _requests_log.info("refused at the edge: %s", message, extra={
            "request_id": rid, "status": status, "outcome": error.code})
        self._held = error_answer(status, error.code, message, rid, extra,
                                  self.server_state.default_headers)
        if not self._answering():
            self._write_held()

    def _answering(self) -> bool:
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _write_held(self) -> None:
        if self._held is not None and not self.transport.is_closing():
            self.transport.write(self._held)
            self.transport.close()
        self._held = None

    def _malformed(self, exc: Exception) -> None:
        if self._phase == _BODY and self.cycle is not None and not self.cycle.response_complete:
            # The request whose body is malformed: unrun if still queued, unanswered if running.
            if self.pipeline and self.pipeline[0][0] is self.cycle:
                self.pipeline.popleft()
            elif not self.cycle.response_started:
                self._abandon(self.cycle)
            else:
                self._stopped = True
                self.transport.close()
                return
        self.logger.info("a malformed request: %s", exc)
        self._refuse(errors.InvalidRequest, "malformed HTTP request")

    def _abandon(self, cycle: RequestResponseCycle) -> None:
        """The application's answer to `cycle` is dropped (a refusal answers it instead); the
        application reads a disconnect."""
        cycle.disconnected = cycle.response_complete = True
        cycle.message_event.set()

    # ---- time --------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._stopped:
            return
        if self.pipeline:  # reading is paused until the answers before are written: not slow
            self._arm(self.body_timeout_s if self._phase == _BODY else self.head_timeout_s)
            return
        cycle = self.cycle
        if self._phase == _BODY and cycle is not None and not cycle.response_started:
            self._abandon(cycle)  # the refusal is its answer
            self._refuse(errors.RequestTimeout,
                         f"the request body did not arrive within {self.body_timeout_s:g}s")
            return
        self.logger.info("closing a connection that sent no whole request %s in time",
                         "body" if self._phase == _BODY else "head")
        metrics.EDGE_CLOSES.labels("head_timeout" if self._phase == _HEAD else "body_timeout").inc()
        self._stopped = True
        self.transport.close()

    # ---- the concurrency limit ---------------------------------------------------------------

    def _over_limit(self) -> bool:
        limit = self.limit_concurrency
        return limit is not None and (self._open() > limit or len(self.tasks) >= limit)

    def _open(self) -> int:
        return sum(1 for c in self.connections if not c.transport.is_closing())

    def _waiting_on_client(self) -> bool:
        return (not self._stopped and not self.transport.is_closing()
                and (self._phase == _BODY or not self._answering()))

    def _make_room(self) -> bool:
        """Closes the connections that have waited longest on their clients, enough to be
        under the limit again; False if none waits on its client."""
        assert self.limit_concurrency is not None
        waiting = sorted((c for c in self.connections
                          if c is not self and isinstance(c, GuardedHttpToolsProtocol)
                          and c._waiting_on_client()), key=lambda c: c._since)
        excess = max(1, self._open() - self.limit_concurrency)
        for victim in waiting[:excess]:
            victim._evict()
        return bool(waiting)

    def _evict(self) -> None:
        cycle = self.cycle
        if self._phase == _BODY and cycle is not None and not cycle.response_started:
            self._abandon(cycle)
            self._refuse(errors.ServerBusy, "the server needed this connection; try again",
                         ((b"retry-after", b"1"),))
        else:  # idle, or a partial head: nothing to answer
            metrics.EDGE_CLOSES.labels("evicted").inc()
            self._stopped = True
            self.transport.close()
