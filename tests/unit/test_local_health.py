"""Issue 11: the local driver's bare-socket health check: 200 is healthy; another status, a
closed port, a silent engine and one that dribbles bytes past the deadline are not."""

from __future__ import annotations

import asyncio

from app.drivers import _health
from tests.harness import free_port


async def _serve(handler: object) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


def answering(status: bytes) -> object:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    return handle


def test_statuses() -> None:
    async def scenario() -> None:
        for status, expected in ((b"200 OK", True), (b"503 Service Unavailable", False),
                                 (b"2000 OK", False)):
            server, port = await _serve(answering(status))
            async with server:
                assert await _health.healthy("127.0.0.1", port) is expected, status
        assert await _health.healthy("127.0.0.1", free_port()) is False  # nothing listens

    asyncio.run(scenario())


def test_a_silent_or_dribbling_engine_is_not_healthy_within_the_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for byte in b"HTTP/1.0 200 OK\r\n":
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        for handler in (silent, dribble):
            server, port = await _serve(handler)
            async with server:
                assert await _health.healthy("127.0.0.1", port, timeout=0.2) is False

    asyncio.run(scenario())
