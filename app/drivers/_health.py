"""The local driver's periodic health check, on bare non-blocking sockets kept open.

A fleet's health checks are most of the reconciler's work at rest. Through httpx one cost
about 1.5 ms of CPU here; a fresh TCP connection per check (connect, close, the engine's
accept) is then most of what is left at 1,000 engines. So each engine keeps one HTTP/1.1
keep-alive connection, watched by the event loop all along: a check is one write and one read.
An engine may close it at any time (its idle timeout, a restart): the close is seen when it
happens, and a request that meets a close before any answer is sent once more on a new
connection.
Anything unexpected (a timeout, bytes nobody asked for, `Connection: close`) closes it; the
next check connects again. The whole exchange has one deadline, so an engine that dribbles
bytes cannot hold it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
_MAX_HEAD = 4096
_MAX_BODY = 4096  # a longer /health body is read once, then the connection is not kept


class _Closed(Exception):
    """The engine closed the connection before answering."""


class _Connection(asyncio.Protocol):
    """A kept connection: the event loop watches it all along (no reader added and removed per
    check), so an answer costs one read and a close is noticed when it happens."""

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock, self.port = sock, port  # our socket object: closable from any event loop
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = 0.0  # when a check last used it (monotonic)
        self._buffer = b""
        self._answer: asyncio.Future[tuple[int, bool]] | None = None
        self._last: tuple[bytes, tuple[int, bool]] = (b"", (0, False))  # an answer, parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    async def ask(self, timeout: float) -> tuple[int, bool]:
        """Send GET /health; the status, and whether the connection may be used again.
        TimeoutError after `timeout` (a bare timer: this is the fleet's hot path)."""
        assert self.transport is not None and self._answer is None
        answer: asyncio.Future[tuple[int, bool]] = self.loop.create_future()
        self._answer = answer
        timer = self.loop.call_later(timeout, _expire, answer)
        self.transport.write(_REQUEST)
        try:
            return await answer
        finally:
            timer.cancel()
            self._answer = None

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        if not self._buffer and data == self._last[0]:
            self._answer.set_result(self._last[1])  # the same bytes as last time: no parsing
            return
        self._buffer += data
        answer = _parse(self._buffer)
        if answer is not None:
            self._last = (self._buffer, answer)
            self._buffer = b""
            self._answer.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            if self._buffer:  # an answer cut short: its status line still counts
                self._answer.set_result((_status(self._buffer), False))
            else:
                self._answer.set_exception(_Closed())
        self._buffer = b""

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and self.loop is _running_loop():
            self.transport.abort()
        else:  # made on an event loop that is gone (tests run one per scenario)
            self.sock.close()


class HealthChecks:
    """One kept-alive connection per engine (by name), for its `GET /health` checks. A
    connection unused for `idle_s` is closed (the engine is checked elsewhere: another
    replica's shard, or it stopped unseen), looked for at most once per `idle_s`."""

    def __init__(self, idle_s: float = 60.0) -> None:
        self._conns: dict[str, _Connection] = {}
        self.idle_s = idle_s
        self._pruned = time.monotonic()

    def __len__(self) -> int:
        return len(self._conns)

    async def healthy(self, name: str, port: int, timeout: float = 1.0) -> bool:
        """True when GET /health answers 200 within `timeout` (twice that at worst, when the
        engine closes the kept connection just as it is asked)."""
        now = time.monotonic()
        if now - self._pruned > self.idle_s:
            self._prune(now)
        try:
            conn = self._kept(name, port)
            if conn is not None:
                conn.used = now
            if conn is not None:
                try:
                    return await self._ask(name, conn, timeout)
                except _Closed:
                    pass  # it closed as we asked: once more, on a new connection
            async with asyncio.timeout(timeout):
                conn = await _connect(port)
                conn.used = now
                self._conns[name] = conn
                return await self._ask(name, conn, timeout)
        except (OSError, TimeoutError, _Closed):
            self.drop(name)  # a late answer must not be taken for the next check's
            return False

    def drop(self, name: str) -> None:
        """Close `name`'s connection (the engine stopped, or the connection is in doubt)."""
        conn = self._conns.pop(name, None)
        if conn is not None:
            _quietly(conn.close)

    def close(self) -> None:
        for name in list(self._conns):
            self.drop(name)

    def _prune(self, now: float) -> None:
        self._pruned = now
        for name in [n for n, c in self._conns.items() if now - c.used > self.idle_s]:
            self.drop(name)

    def _kept(self, name: str, port: int) -> _Connection | None:
        conn = self._conns.get(name)
        if conn is not None and (conn.closed or conn.port != port
                                 or conn.loop is not asyncio.get_running_loop()):
            self.drop(name)
            return None
        return conn

    async def _ask(self, name: str, conn: _Connection, timeout: float) -> bool:
        status, keep = await conn.ask(timeout)
        if not keep:
            self.drop(name)
        return status == 200


async def _connect(port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        _, conn = await loop.create_connection(lambda: _Connection(sock, port), sock=sock)
    except BaseException:
        sock.close()
        raise
    return conn


def _parse(data: bytes) -> tuple[int, bool] | None:
    """A whole answer's status, and whether the connection may be used again; None: more to
    come."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return (_status(data), False) if len(data) > _MAX_HEAD else None
    lines = head.lower().split(b"\r\n")
    headers = dict(_header(line) for line in lines[1:])
    keep = lines[0].startswith(b"http/1.1 ") and headers.get(b"connection") != b"close"
    length = _content_length(headers)
    if length is None or length > _MAX_BODY:
        return _status(head), False  # no way to tell where the body ends, or not worth reading
    if len(body) < length:
        return None
    return _status(head), keep and len(body) == length


def _expire(answer: asyncio.Future[tuple[int, bool]]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _quietly(close: Callable[[], None]) -> None:
    try:
        close()
    except (OSError, RuntimeError):  # already closed, or its event loop is
        pass


def _status(head: bytes) -> int:
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return 0


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip(), value.strip()


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    if b"transfer-encoding" in headers:
        return None
    value = headers.get(b"content-length", b"")
    return int(value) if value.isdigit() else None


async def healthy(host: str, port: int, timeout: float = 1.0) -> bool:
    """One check on a connection of its own (closed after): for a single look."""
    checks = HealthChecks()
    try:
        return await checks.healthy("", port, timeout)
    finally:
        checks.close()
