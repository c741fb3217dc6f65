"""The Python client (app.client) against a respx-mocked orchestrator: errors by code,
network failures left as httpx errors, unreadable and slow answers."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx

from app.api.spec import STATUS_BY_CODE
from app.client import (
    ERRORS_BY_CODE,
    AsyncClient,
    Client,
    EngineNotFound,
    Internal,
    OrchestratorError,
    RateLimited,
    SchedulerUnavailable,
    UnexpectedResponse,
)

BASE = "http://orch.test"
ENGINE = {"user_id": "bob", "status": "running", "url": "http://127.0.0.1:20000",
          "engine_version": "v1", "created_at": "2026-01-01T00:00:00.000Z",
          "updated_at": "2026-01-01T00:00:01.000Z", "last_admit_at": None, "restarts": 0,
          "failure_reason": None}


def error(code: str, status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers={"X-Request-ID": "rid-1", **headers},
                          json={"error": {"code": code, "message": "no", "request_id": "rid-1"}})


@pytest.fixture
def api():  # type: ignore[no-untyped-def]
    with respx.mock(base_url=BASE) as mock, Client(BASE, "pk") as client:
        yield client, mock


def test_every_code_of_the_spec_has_its_exception() -> None:
    assert set(STATUS_BY_CODE) <= set(ERRORS_BY_CODE)


@pytest.mark.parametrize("code", sorted(STATUS_BY_CODE))
def test_each_error_code_raises_its_class(api, code: str) -> None:  # type: ignore[no-untyped-def]
    client, mock = api
    mock.get("/engines/bob").mock(return_value=error(code, STATUS_BY_CODE[code]))
    with pytest.raises(ERRORS_BY_CODE[code]) as caught:
        client.get("bob")
    assert (caught.value.status, caught.value.code, caught.value.request_id) == \
        (STATUS_BY_CODE[code], code, "rid-1")


def test_the_platform_key_is_sent_once(api) -> None:  # type: ignore[no-untyped-def]
    client, mock = api
    route = mock.get("/engines/bob").mock(return_value=httpx.Response(200, json=ENGINE))
    assert client.get("bob").status == "running"
    assert route.calls.last.request.headers.get_list("x-platform-key") == ["pk"]


@pytest.mark.parametrize("value,expected", [("3", 3.0), ("0", 0.0), ("-4", 0.0), ("nan", None),
                                            ("inf", None), ("soon", None)])
def test_retry_after(api, value: str, expected: float | None) -> None:  # type: ignore[no-untyped-def]
    client, mock = api
    mock.post("/engines/bob/admit").mock(return_value=error("RATE_LIMITED", 429, **{"Retry-After": value}))
    with pytest.raises(RateLimited) as caught:
        client.admit("bob")
    assert caught.value.retry_after == expected


@pytest.mark.parametrize("failure", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"),
                                     httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("cut")])
def test_network_failures_stay_httpx_errors(api, failure: Exception) -> None:  # type: ignore[no-untyped-def]
    client, mock = api
    mock.post("/engines/bob/admit").mock(side_effect=failure)
    with pytest.raises(type(failure)):
        client.admit("bob")


@pytest.mark.parametrize("answer,kind", [
    (httpx.Response(500, content=b"Internal Server Error"), OrchestratorError),  # not our shape
    (httpx.Response(502, content=b"<html>bad gateway</html>"), OrchestratorError),
    (httpx.Response(503, json={"error": {"code": "SCHEDULER_UNAVAILABLE", "message": "down",
                                         "request_id": "r"}}), SchedulerUnavailable),
    (httpx.Response(500, json={"error": {"code": "INTERNAL", "message": "bug",
                                         "request_id": "r"}}), Internal),
    (httpx.Response(404, json={"error": "flat"}), OrchestratorError),
])
def test_5xx_and_odd_error_bodies(api, answer: httpx.Response, kind: type) -> None:  # type: ignore[no-untyped-def]
    client, mock = api
    mock.get("/engines/bob").mock(return_value=answer)
    with pytest.raises(OrchestratorError) as caught:
        client.get("bob")
    assert type(caught.value) is kind
    if kind is OrchestratorError:
        assert caught.value.code == f"HTTP_{answer.status_code}"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'"running"', b"", b'{"user_id": "bob"}',
                                  b'{"engines": "nope", "next_cursor": null}'])
def test_malformed_json_is_an_unexpected_response(api, body: bytes) -> None:  # type: ignore[no-untyped-def]
    client, mock = api
    mock.get("/engines/bob").mock(return_value=httpx.Response(200, content=body))
    mock.get("/engines").mock(return_value=httpx.Response(200, content=body))
    with pytest.raises(UnexpectedResponse):
        client.get("bob")
    with pytest.raises(UnexpectedResponse):
        client.list()


def test_readyz_503_is_an_answer(api) -> None:  # type: ignore[no-untyped-def]
    client, mock = api
    mock.get("/readyz").mock(return_value=httpx.Response(503, json={"status": "unavailable",
                                                                    "reason": "db"}))
    health = client.readyz()
    assert (health.ok, health.status, health.reason) == (False, "unavailable", "db")


class SlowBody(httpx.SyncByteStream):
    """A body whose second read times out, as httpx reports a stalled server."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield b'{"user_id": "bo'
        raise httpx.ReadTimeout("the server stopped sending")


def test_a_body_that_stalls_is_a_timeout(api) -> None:  # type: ignore[no-untyped-def]
    client, mock = api
    mock.get("/engines/bob").mock(return_value=httpx.Response(200, stream=SlowBody()))
    with pytest.raises(httpx.ReadTimeout):
        client.get("bob")


def test_the_async_client_behaves_the_same() -> None:
    async def scenario() -> None:
        with respx.mock(base_url=BASE) as mock:
            mock.get("/engines/nobody").mock(return_value=error("ENGINE_NOT_FOUND", 404))
            mock.get("/engines/bob").mock(return_value=httpx.Response(200, json=ENGINE))
            mock.post("/engines/bob/stop").mock(side_effect=httpx.ConnectError("refused"))
            mock.get("/engines/x").mock(return_value=httpx.Response(200, content=b"{"))
            async with AsyncClient(BASE, "pk") as client:
                assert (await client.get("bob")).user_id == "bob"
                with pytest.raises(EngineNotFound):
                    await client.get("nobody")
                with pytest.raises(httpx.ConnectError):
                    await client.stop("bob")
                with pytest.raises(UnexpectedResponse):
                    await client.get("x")

    asyncio.run(scenario())


def test_paging_follows_cursors(api) -> None:  # type: ignore[no-untyped-def]
    client, mock = api
    event = {"id": 2, "at": "2026-01-01T00:00:00.000Z", "engine": "e-p-bob-1", "event": "stop",
             "from": "running", "to": "stopping", "reason": None, "request_id": None}
    route = mock.get("/engines/bob/events").mock(side_effect=[
        httpx.Response(200, json={"events": [event], "next_cursor": "c1"}),
        httpx.Response(200, json={"events": [{**event, "id": 1}], "next_cursor": None})])
    assert [e.id for e in client.iter_events("bob", page_size=1)] == [2, 1]
    assert route.calls[1].request.url.params["cursor"] == "c1"
