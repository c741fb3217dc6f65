"""app/engine_http.py against respx-mocked engines: every way an engine can answer badly."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import respx

from app import engine_http

URL = "http://engine.test:20000"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _with_client(check):  # type: ignore[no-untyped-def]
    async with engine_http.client() as http:
        return await check(http)


@respx.mock
@pytest.mark.parametrize("answer,expected", [
    (httpx.Response(200, text="ok"), True),
    (httpx.Response(200, content=b"{not json"), True),  # /health's body is not read as JSON
    (httpx.Response(500), False),
    (httpx.Response(503, json={"status": "booting"}), False),
    (httpx.Response(401), False),
    (httpx.ConnectError("connection refused"), False),
    (httpx.ConnectTimeout("connect timeout"), False),
    (httpx.ReadTimeout("read timeout"), False),
    (httpx.RemoteProtocolError("peer closed"), False),
])
def test_healthy(answer: object, expected: bool) -> None:
    route = respx.get(f"{URL}/health")
    if isinstance(answer, Exception):
        route.side_effect = answer
    else:
        route.return_value = answer
    assert run(_with_client(lambda http: engine_http.healthy(http, URL))) is expected
    assert route.call_count == 1


@respx.mock
def test_a_slow_health_answer_is_cut_off_at_the_deadline() -> None:
    async def slow(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    respx.get(f"{URL}/health").mock(side_effect=slow)
    started = time.monotonic()
    assert run(_with_client(lambda http: engine_http.healthy(http, URL, timeout=0.2))) is False
    assert time.monotonic() - started < 2


class DribbledBody(httpx.AsyncByteStream):
    """A body that arrives one byte at a time, far slower than any deadline."""

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for byte in b"ok":
            await asyncio.sleep(1)
            yield bytes([byte])


@respx.mock
def test_a_dribbled_body_is_cut_off_at_the_deadline() -> None:
    respx.get(f"{URL}/health").mock(return_value=httpx.Response(200, stream=DribbledBody()))
    started = time.monotonic()
    assert run(_with_client(lambda http: engine_http.healthy(http, URL, timeout=0.2))) is False
    assert time.monotonic() - started < 1.5


@respx.mock
def test_a_body_that_breaks_off_is_no_answer() -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield b"o"
            raise httpx.ReadError("connection reset")

    respx.get(f"{URL}{engine_http.KEYCHECK_PATH}").mock(return_value=httpx.Response(404, stream=Broken()))
    assert run(_with_client(lambda http: engine_http.accepts(http, URL, "k"))) is None


@respx.mock
@pytest.mark.parametrize("answer,expected", [
    (httpx.Response(404), True),  # authorised; no such route
    (httpx.Response(200), True),
    (httpx.Response(401), False),
    (httpx.Response(403), False),
    (httpx.Response(500), None),  # a broken engine says nothing about the key
    (httpx.Response(502, content=b"<html>"), None),
    (httpx.ConnectError("refused"), None),
    (httpx.ReadTimeout("slow"), None),
])
def test_accepts(answer: object, expected: bool | None) -> None:
    route = respx.get(f"{URL}{engine_http.KEYCHECK_PATH}")
    if isinstance(answer, Exception):
        route.side_effect = answer
    else:
        route.return_value = answer
    assert run(_with_client(lambda http: engine_http.accepts(http, URL, "key-1"))) is expected
    assert route.calls.last.request.headers["authorization"] == "Bearer key-1"


def keycheck_by_key(answers: dict[str, list[int]]):  # type: ignore[no-untyped-def]
    """A keycheck route answering each key from its own list of statuses (the last repeats)."""
    def answer(request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"].removeprefix("Bearer ")
        statuses = answers[key]
        return httpx.Response(statuses.pop(0) if len(statuses) > 1 else statuses[0])
    return answer


@respx.mock
def test_confirm_key_waits_for_the_new_key_and_the_old_one_refused() -> None:
    respx.get(f"{URL}{engine_http.KEYCHECK_PATH}").mock(side_effect=keycheck_by_key(
        {"new": [401, 500, 404], "old": [404, 404, 401]}))
    assert run(_with_client(lambda http: engine_http.confirm_key(http, URL, "new", "old", 5))) is True


@respx.mock
def test_confirm_key_gives_up_when_the_old_key_keeps_working() -> None:
    respx.get(f"{URL}{engine_http.KEYCHECK_PATH}").mock(side_effect=keycheck_by_key(
        {"new": [404], "old": [404]}))
    started = time.monotonic()
    assert run(_with_client(lambda http: engine_http.confirm_key(http, URL, "new", "old", 0.3))) is False
    assert time.monotonic() - started < 2


@respx.mock
def test_confirm_key_gives_up_on_an_engine_that_only_errs() -> None:
    respx.get(f"{URL}{engine_http.KEYCHECK_PATH}").mock(return_value=httpx.Response(500))
    assert run(_with_client(lambda http: engine_http.confirm_key(http, URL, "new", None, 0.2))) is False


@respx.mock
def test_engine_traffic_ignores_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    route = respx.get(f"{URL}/health").mock(return_value=httpx.Response(200))
    assert run(_with_client(lambda http: engine_http.healthy(http, URL))) is True
    assert route.calls.last.request.url.host == "engine.test"
