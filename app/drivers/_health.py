"""The local driver's periodic health check, on bare non-blocking sockets kept open (issue 11).

A fleet's health checks are most of the reconciler's work at rest. Through httpx one cost
about 1.5 ms of CPU here; a fresh TCP connection per check (connect, close, the engine's
accept) was still most of what was left at 1,000 engines. So each engine keeps one HTTP/1.1
keep-alive connection: a check is one write and one read. An engine may close it at any time
(its idle timeout, a restart): before reuse a peek tells a closed connection from an idle one,
and a request that meets a close before any answer is sent once more on a new connection.
Anything unexpected (a timeout, bytes nobody asked for, `Connection: close`) closes it; the
next check connects again. The whole exchange has one deadline, so an engine that dribbles
bytes cannot hold it.
"""

from __future__ import annotations

import asyncio
import socket

_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
_MAX_HEAD = 4096
_MAX_BODY = 4096  # a longer /health body is read once, then the connection is not kept


class _Closed(Exception):
    """The engine closed the connection before answering."""


class HealthChecks:
    """One kept-alive connection per engine (by name), for its `GET /health` checks."""

    def __init__(self) -> None:
        self._conns: dict[str, tuple[int, socket.socket]] = {}  # name -> (port, socket)

    def __len__(self) -> int:
        return len(self._conns)

    async def healthy(self, name: str, port: int, timeout: float = 1.0) -> bool:
        """True when GET /health answers 200 within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                sock = self._idle(name, port)
                if sock is not None:
                    try:
                        return await self._exchange(name, port, sock)
                    except (_Closed, ConnectionError):
                        pass  # it closed as we asked: once more, on a new connection
                return await self._exchange(name, port, await _connect(port))
        except (OSError, TimeoutError, _Closed):
            self.drop(name)
            return False

    def drop(self, name: str) -> None:
        """Close `name`'s connection (the engine stopped, or the connection is in doubt)."""
        entry = self._conns.pop(name, None)
        if entry is not None:
            entry[1].close()

    def close(self) -> None:
        for name in list(self._conns):
            self.drop(name)

    def _idle(self, name: str, port: int) -> socket.socket | None:
        """`name`'s kept connection if it is still open and has nothing unread."""
        entry = self._conns.pop(name, None)
        if entry is None:
            return None
        kept_port, sock = entry
        if kept_port == port:
            try:
                sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return sock  # open, and quiet: as it should be
            except OSError:
                pass
        sock.close()  # closed by the engine, another port, or bytes nobody asked for
        return None

    async def _exchange(self, name: str, port: int, sock: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, _REQUEST)
            status, keep = await _read_response(loop, sock)
        except BaseException:
            sock.close()
            raise
        if keep:
            self._conns[name] = (port, sock)
        else:
            sock.close()
        return status == 200


async def _connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_response(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[int, bool]:
    """The status code, and whether the connection may be used again."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > _MAX_HEAD:
            return _status(data), False
        chunk = await loop.sock_recv(sock, _MAX_HEAD)
        if not chunk:
            if not data:
                raise _Closed
            return _status(data), False  # an answer cut short: its status line still counts
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = _status(head)
    lines = head.lower().split(b"\r\n")
    headers = dict(_header(line) for line in lines[1:])
    keep = lines[0].startswith(b"http/1.1 ") and headers.get(b"connection") != b"close"
    length = _content_length(headers)
    if length is None or length > _MAX_BODY:
        return status, False  # no way to tell where the body ends, or not worth reading
    while len(body) < length:
        chunk = await loop.sock_recv(sock, length - len(body))
        if not chunk:
            return status, False
        body += chunk
    return status, keep and len(body) == length


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
