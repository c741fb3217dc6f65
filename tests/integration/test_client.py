"""The Python client (`app.client`) against the live server: every endpoint, sync and async,
and every error code it can meet, each as its own exception class."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from app.client import (
    Admission,
    AsyncClient,
    BootTimeout,
    CapacityExhausted,
    Client,
    Engine,
    EngineAlreadyExists,
    EngineAlreadyRunning,
    EngineNotFound,
    EngineNotRunning,
    Internal,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    OrchestratorError,
    PortExhaustion,
    ProvisionedEngine,
    QuotaExceeded,
    RateLimited,
    SchedulerUnavailable,
    Unauthorized,
    UnexpectedResponse,
    error_from_response,
    raise_for_error,
)
from tests.harness import Orchestrator

# ---- fixtures: one orchestrator for the module (each start costs about a second) ------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    orch = Orchestrator(tmp_path_factory.mktemp("client")).start()
    try:
        orch.product("acme")
        yield orch
    finally:
        orch.close()


def connect(orch: Orchestrator, product: str = "acme") -> Client:
    # trust_env=False: a proxy from the environment must not sit between tests and 127.0.0.1.
    return Client(orch.url, orch.keys[product], timeout=30, trust_env=False)


@pytest.fixture
def client(server: Orchestrator) -> Iterator[Client]:
    with connect(server) as api:
        yield api


def engine_request(method: str, url: str, key: str, path: str = "/v1/memory/colour",
                   content: bytes | None = None) -> httpx.Response:
    """A call to the engine itself, the way a product calls it with the admitted key."""
    return httpx.request(method, url + path, content=content, trust_env=False, timeout=10,
                         headers={"Authorization": f"Bearer {key}"})


def expect(error: type[OrchestratorError], status: int,
           call: Callable[[], object]) -> OrchestratorError:
    with pytest.raises(error) as caught:
        call()
    exc = caught.value
    assert type(exc) is error  # the exact class, not only a base of it
    assert exc.status == status and exc.code == error.CODE
    assert exc.message and exc.request_id
    return exc


# ---- every endpoint ---------------------------------------------------------------------------

ODD_USER = "ann é?%#& +x"  # every character here means something in a URL


def test_every_endpoint(server: Orchestrator) -> None:
    server.product("tour")
    with connect(server, "tour") as api:
        created = api.provision(ODD_USER, request_id="tour-provision")
        assert isinstance(created, ProvisionedEngine) and created.api_key
        engine = created.engine
        assert (engine.user_id, engine.status, engine.restarts) == (ODD_USER, "running", 0)
        assert engine.url and engine.failure_reason is None
        assert engine.created_at.tzinfo is not None
        assert engine.created_at <= datetime.now(UTC)
        assert engine_request("PUT", engine.url, created.api_key, content=b"blue").is_success

        assert api.get(ODD_USER).user_id == ODD_USER

        admission = api.admit(ODD_USER)
        assert isinstance(admission, Admission)
        assert admission.admitted and admission.status == "running" and not admission.provisioned
        assert (admission.url, admission.api_key) == (engine.url, created.api_key)
        assert api.get(ODD_USER).last_admit_at is not None

        rotated = api.rotate_key(ODD_USER)
        assert rotated.api_key != created.api_key and rotated.engine.status == "running"
        assert engine_request("GET", engine.url, created.api_key).status_code == 401
        assert engine_request("GET", engine.url, rotated.api_key).text == "blue"

        assert api.stop(ODD_USER).status == "stopped"
        denied = api.admit(ODD_USER, auto_wake=True)
        assert denied == Admission(admitted=False, user_id=ODD_USER, status="stopped",
                                   reason="engine_stopped")
        assert api.start(ODD_USER).status == "running"

        api.provision("..")  # a dot segment: it must reach the server, not be resolved away
        assert api.get("..").user_id == ".."
        first = api.list(limit=1)
        assert len(first.engines) == 1 and first.next_cursor
        second = api.list(limit=1, cursor=first.next_cursor)
        assert {first.engines[0].user_id, second.engines[0].user_id} == {ODD_USER, ".."}
        assert sorted(e.user_id for e in api.iter_engines(page_size=1)) == ["..", ODD_USER]
        assert [e.user_id for e in api.list(status="stopped").engines] == []

        events = api.events(ODD_USER).events
        assert [e.id for e in events] == sorted((e.id for e in events), reverse=True)
        kinds = {e.event for e in events}
        assert {"provision", "rotate_key", "stop", "start"} <= kinds, kinds
        assert any(e.request_id == "tour-provision" for e in events)
        assert all(isinstance(e.at, datetime) for e in events)
        first = api.events(ODD_USER, limit=2)
        assert len(first.events) == 2 and first.next_cursor is not None
        assert [e.id for e in api.iter_events(ODD_USER, page_size=2)] == [e.id for e in events]
        assert all(e.engine == events[0].engine for e in events)

        api.destroy(ODD_USER)
        api.destroy("..")
        expect(EngineNotFound, 404, lambda: api.get(ODD_USER))
        assert api.events(ODD_USER).events[0].event == "destroyed"  # the audit trail outlives the engine
        assert list(api.iter_engines()) == []


def test_service_endpoints(client: Client) -> None:
    assert client.healthz().ok and client.healthz().status == "ok"
    ready = client.readyz()
    assert ready.ok and ready.status == "ready"
    assert "orch_requests_total" in client.metrics()
    assert "/engines/{user_id}/admit" in client.openapi()["paths"]


def test_admit_denied_then_auto_provisioned(client: Client) -> None:
    assert client.admit("newcomer") == Admission(admitted=False, user_id="newcomer", status=None,
                                                 reason="engine_not_found")
    admission = client.admit("newcomer", auto_provision=True)
    assert admission.admitted and admission.provisioned and admission.api_key
    assert engine_request("GET", admission.url or "", admission.api_key or "").status_code == 404
    client.destroy("newcomer")


def test_async_client_round_trip(server: Orchestrator) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.url, server.keys["acme"], timeout=30,
                               trust_env=False) as api:
            created = await api.provision("async-user", request_id="async-1")
            admission = await api.admit("async-user")
            assert admission.admitted and admission.api_key == created.api_key
            rotated = await api.rotate_key("async-user")
            assert rotated.api_key != created.api_key
            assert (await api.get("async-user")).status == "running"
            assert "async-user" in [e.user_id async for e in api.iter_engines(page_size=1)]
            assert (await api.events("async-user")).events[-1].request_id == "async-1"
            assert (await api.stop("async-user")).status == "stopped"
            assert (await api.start("async-user")).status == "running"
            assert (await api.list(status="running")).engines
            assert (await api.healthz()).ok and (await api.readyz()).ok
            await api.destroy("async-user")
            with pytest.raises(EngineNotFound):
                await api.get("async-user")

    asyncio.run(scenario())


# ---- every error code the live server can be made to answer -----------------------------------


def test_invalid_request(client: Client) -> None:
    expect(InvalidRequest, 400, lambda: client.provision("x" * 129))
    expect(InvalidRequest, 400, lambda: client.get("a/b"))  # encoded, so refused, not re-routed
    expect(InvalidRequest, 400, lambda: client.list(limit=0))
    expect(InvalidRequest, 400, lambda: client.list(status="dancing"))
    expect(InvalidRequest, 400, lambda: client.events("bob", limit=100000))


def test_unauthorized(server: Orchestrator) -> None:
    with Client(server.url, "orch_pk_wrong", trust_env=False) as api:
        expect(Unauthorized, 401, api.list)
        expect(Unauthorized, 401, lambda: api.provision("eve"))


def test_engine_not_found_on_every_user_call(client: Client) -> None:
    for call in (client.get, client.start, client.stop, client.rotate_key, client.destroy):
        expect(EngineNotFound, 404, lambda call=call: call("nobody"))


def test_conflicts_and_request_id(client: Client) -> None:
    client.provision("dup")
    try:
        error = expect(EngineAlreadyExists, 409, lambda: client.provision("dup", request_id="rq-7"))
        assert error.request_id == "rq-7"  # ours, echoed: the one to quote to the operator
        assert "dup" in str(error) and "409 ENGINE_ALREADY_EXISTS" in str(error)
        expect(EngineAlreadyRunning, 409, lambda: client.start("dup"))
        client.stop("dup")
        expect(EngineNotRunning, 409, lambda: client.stop("dup"))
        expect(EngineNotRunning, 409, lambda: client.rotate_key("dup"))
    finally:
        client.destroy("dup")


def test_quota_exceeded(server: Orchestrator) -> None:
    server.product("tiny", max_engines=1)
    with connect(server, "tiny") as api:
        api.provision("only")
        expect(QuotaExceeded, 429, lambda: api.provision("second"))
        expect(QuotaExceeded, 429, lambda: api.admit("second", auto_provision=True))
        api.destroy("only")


def test_rate_limited_carries_retry_after(server: Orchestrator) -> None:
    server.product("slow", rpm=1)
    with connect(server, "slow") as api:
        assert api.admit("x").reason == "engine_not_found"
        error = expect(RateLimited, 429, lambda: api.admit("x"))
        assert error.retry_after is not None and error.retry_after >= 1


def test_route_errors_map_from_real_responses(server: Orchestrator) -> None:
    """The client never builds a bad route itself, so these come from raw requests."""
    raw = server.client("acme", timeout=10)
    expect(NotFound, 404, lambda: raise_for_error(raw.get("/nope")))
    error = expect(MethodNotAllowed, 405, lambda: raise_for_error(raw.put("/engines/bob")))
    assert error.response is not None and "DELETE" in error.response.headers["allow"]
    raise_for_error(raw.get("/healthz"))  # a success is not an error


def test_port_exhaustion_and_boot_timeout(tmp_path: Path) -> None:
    # One port, and a short boot timeout with no automatic restarts.
    orch = Orchestrator(tmp_path, ports=1,
                        env={"ORCH_BOOT_TIMEOUT_S": "1", "ORCH_MAX_RESTARTS": "0"}).start()
    try:
        orch.product("acme")
        with connect(orch) as api:
            expect(BootTimeout, 504,
                   lambda: api.provision("stuck", engine_version="x+fault-never-healthy"))
            stuck = api.get("stuck")
            assert (stuck.status, stuck.failure_reason) == ("failed", "boot_timeout")
            api.destroy("stuck")  # frees the one port
            api.provision("first")
            expect(PortExhaustion, 503, lambda: api.provision("second"))
            expect(PortExhaustion, 503, lambda: api.admit("third", auto_provision=True))
    finally:
        orch.close()


# ---- codes the live server only answers when something breaks: a mock transport ---------------


def mock_client(status: int, body: bytes, headers: dict[str, str] | None = None) -> Client:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers=headers or {})

    return Client("http://orch.test", "key", transport=httpx.MockTransport(answer))


def error_body(code: str) -> bytes:
    return b'{"error": {"code": "%s", "message": "m", "request_id": "r-1"}}' % code.encode()


@pytest.mark.parametrize("status,error", [(503, SchedulerUnavailable), (503, CapacityExhausted),
                                          (500, Internal)])
def test_error_codes_through_the_client(status: int, error: type[OrchestratorError]) -> None:
    assert error.CODE
    with mock_client(status, error_body(error.CODE)) as api:
        caught = expect(error, status, lambda: api.get("bob"))
    assert (caught.message, caught.request_id, caught.retry_after) == ("m", "r-1", None)


def test_unknown_and_unreadable_answers() -> None:
    with mock_client(409, error_body("ENGINE_ON_FIRE"), {"Retry-After": "2"}) as api:
        with pytest.raises(OrchestratorError) as caught:
            api.stop("bob")
    assert type(caught.value) is OrchestratorError  # a newer server's code: the base class
    assert (caught.value.code, caught.value.retry_after) == ("ENGINE_ON_FIRE", 2.0)

    past = "Wed, 21 Oct 2015 07:28:00 GMT"  # an HTTP date already gone: retry now
    proxy = httpx.Response(502, content=b"<html>bad gateway</html>",
                           headers={"X-Request-ID": "edge-9", "Retry-After": past})
    error = error_from_response(proxy)
    assert (type(error), error.code, error.request_id, error.retry_after) == \
        (OrchestratorError, "HTTP_502", "edge-9", 0.0)

    with mock_client(200, b"not json") as api:
        with pytest.raises(UnexpectedResponse):
            api.get("bob")
    with mock_client(200, b'{"user_id": "bob", "extra": 1}') as api:  # status etc. missing
        with pytest.raises(UnexpectedResponse):
            api.get("bob")


def test_user_ids_are_one_encoded_segment() -> None:
    paths: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path)
        return httpx.Response(200, json={"events": [], "next_cursor": None})

    with Client("http://orch.test/prefix", "key", transport=httpx.MockTransport(answer)) as api:
        for user_id in ("a b", "q?x#y", "100%", "é", ".", "..", "a/b"):
            api.events(user_id)
    assert paths == [b"/prefix/engines/" + p + b"/events" for p in (
        b"a%20b", b"q%3Fx%23y", b"100%25", b"%C3%A9", b"%2E", b"%2E%2E", b"a%2Fb")]


def test_newer_server_fields_are_ignored() -> None:
    body = (b'{"user_id": "bob", "status": "running", "url": null, "engine_version": "v",'
            b' "created_at": "2024-05-01T12:00:00.123Z", "updated_at": "2024-05-01T12:00:01Z",'
            b' "last_admit_at": null, "restarts": 0, "failure_reason": null, "zone": "eu"}')
    with mock_client(200, body) as api:
        engine = api.get("bob")
    assert engine == Engine("bob", "running", None, "v",
                            datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC),
                            datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC), None, 0, None)
