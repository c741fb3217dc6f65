"""The local driver's bare-socket health check: 200 is healthy; another status, a
closed port, a silent engine and one that dribbles bytes past the deadline are not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from app.drivers import _health
from tests.harness import free_port


@asynccontextmanager
async def checking(engine: KeepAlive) -> AsyncIterator[tuple[int, _health.HealthChecks]]:
    """The engine served on a free port, and the checks that keep connections to it."""
    server, port = await _serve(engine.handle)
    checks = _health.HealthChecks()
    async with server:
        try:
            yield port, checks
        finally:
            checks.close()


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


# ---- keep-alive (a check on a kept connection is one write and one read) -------------------

class KeepAlive:
    """An HTTP/1.1 /health server that counts connections and requests, and can be told to
    close after each answer, to say `Connection: close`, or to stop answering."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.close_after = False
        self.say_close = False
        self.silent = False
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.silent:
                    await asyncio.sleep(5)
                extra = b"Connection: close\r\n" if self.say_close else b""
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + extra + b"\r\nok")
                await writer.drain()
                if self.close_after or self.say_close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def hang_up(self) -> None:
        """Close every open connection (an engine's idle timeout, or a restart)."""
        for writer in self.writers:
            writer.close()


def test_a_kept_connection_serves_every_check_and_is_dropped_on_request() -> None:
    async def scenario() -> None:
        engine = KeepAlive()
        async with checking(engine) as (port, checks):
            for _ in range(5):
                assert await checks.healthy("e", port) is True
            assert (engine.connections, engine.requests, len(checks)) == (1, 5, 1)
            checks.drop("e")
            assert len(checks) == 0
            assert await checks.healthy("e", port) is True
            assert engine.connections == 2

    asyncio.run(scenario())


def test_an_engine_that_closes_the_connection_is_checked_on_a_new_one() -> None:
    async def scenario() -> None:
        engine = KeepAlive()
        async with checking(engine) as (port, checks):
            assert await checks.healthy("e", port) is True
            engine.hang_up()  # closed while idle: the peek sees it
            await asyncio.sleep(0.05)
            assert await checks.healthy("e", port) is True
            assert engine.connections == 2
            engine.say_close = True  # `Connection: close`: answered, then not kept
            assert await checks.healthy("e", port) is True
            assert len(checks) == 0
            engine.say_close, engine.close_after = False, True  # closes without saying so
            assert await checks.healthy("e", port) is True
            await asyncio.sleep(0.05)
            assert await checks.healthy("e", port) is True
            assert (engine.connections, engine.requests) == (4, 5)

    asyncio.run(scenario())


def test_a_kept_connection_to_an_engine_that_stops_answering_fails_and_is_dropped() -> None:
    async def scenario() -> None:
        engine = KeepAlive()
        async with checking(engine) as (port, checks):
            assert await checks.healthy("e", port) is True
            engine.silent = True  # hung: the connection is open, nothing answers
            assert await checks.healthy("e", port, timeout=0.2) is False
            assert len(checks) == 0  # a late answer must not be read as the next one's
            engine.silent = False
            assert await checks.healthy("e", port) is True
        assert await checks.healthy("e", port, timeout=0.5) is False  # nothing listens now

    asyncio.run(scenario())


def test_a_connection_kept_for_another_port_is_not_reused() -> None:
    async def scenario() -> None:
        first, second = KeepAlive(), KeepAlive()
        server1, port1 = await _serve(first.handle)
        server2, port2 = await _serve(second.handle)
        checks = _health.HealthChecks()
        async with server1, server2:
            assert await checks.healthy("e", port1) is True
            assert await checks.healthy("e", port2) is True  # the engine moved port
            assert (first.requests, second.requests, len(checks)) == (1, 1, 1)
            checks.close()

    asyncio.run(scenario())


def test_a_connection_no_check_uses_any_more_is_closed() -> None:
    """An engine checked elsewhere now (another replica's shard) leaves no socket open here."""
    async def scenario() -> None:
        engine = KeepAlive()
        server, port = await _serve(engine.handle)
        checks = _health.HealthChecks(idle_s=60)
        async with server:
            assert await checks.healthy("a", port) is True
            assert await checks.healthy("b", port) is True
            # A minute on (moved back rather than waited for): a was not used since; b just was.
            checks._conns["a"].used -= 61
            checks._pruned -= 61
            assert await checks.healthy("b", port) is True
            assert len(checks) == 1 and engine.connections == 2
            checks.close()

    asyncio.run(scenario())
