"""The double's Consul http check (tests/doubles/checks.py), as Consul's CheckHTTP does it: a
new connection per check that says `Connection: close`, Consul's User-Agent and Accept unless
the check's Header sets them, 2xx passing / 429 warning / else critical, and the Output
`HTTP <method> <url>: <status line> Output: <body>`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.doubles.checks import ServiceManager

pytestmark = pytest.mark.timeout(30)


async def _serving(answer: bytes, seen: list[bytes]) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _probe(check: dict[str, Any], port: int, timeout: float) -> tuple[str, str]:
    return await ServiceManager.__new__(ServiceManager)._http(check, port, timeout)  # no state


def _check(answer: bytes, check: dict[str, Any]) -> tuple[tuple[str, str], list[bytes], int]:
    async def work() -> tuple[tuple[str, str], list[bytes], int]:
        seen: list[bytes] = []
        server, port = await _serving(answer, seen)
        try:
            return await _probe(check, port, 2.0), seen, port
        finally:
            server.close()
            await server.wait_closed()
    return asyncio.run(work())


def test_a_passing_check_and_what_it_sends() -> None:
    (status, output), [request], port = _check(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", {"Path": "health"})
    assert status == "passing"
    assert output == f"HTTP GET http://127.0.0.1:{port}/health: 200 OK Output: ok"
    lines = request.decode().split("\r\n")
    assert lines[0] == "GET /health HTTP/1.1"
    assert "Connection: close" in lines and "User-Agent: Consul Health Check" in lines
    assert "Accept: text/plain, text/*, */*" in lines


def test_the_checks_own_headers_and_method_win() -> None:
    (status, output), [request], _ = _check(
        b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nslow\r\n0\r\n\r\n",
        {"Path": "/health", "Method": "HEAD", "Header": {"User-Agent": ["probe"], "X-A": ["1", "2"]}})
    assert status == "warning" and output.endswith(": 429 Too Many Requests Output: slow")
    lines = request.decode().split("\r\n")
    assert lines[0] == "HEAD /health HTTP/1.1"
    assert "User-Agent: probe" in lines and "User-Agent: Consul Health Check" not in lines
    assert "X-A: 1" in lines and "X-A: 2" in lines


@pytest.mark.parametrize(("answer", "status"), [
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", "critical"),
    (b"garbage", "critical"),
])
def test_anything_else_is_critical(answer: bytes, status: str) -> None:
    (got, _), _, _ = _check(answer, {"Path": "/health"})
    assert got == status


def test_nothing_listening_is_critical() -> None:
    async def work() -> tuple[str, str]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await _probe({"Path": "/health"}, port, 1.0)
    status, output = asyncio.run(work())
    assert status == "critical" and "/health" in output
