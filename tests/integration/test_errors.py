"""Every error code of the spec: status, code, and that nothing changed."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.engines import proc_state
from tests.harness import OWN_USER, Orchestrator, read_until_closed


def snapshot(orch: Orchestrator) -> tuple[list, list, list]:
    """Everything a refused request must leave alone (audit events included)."""
    return (orch.rows("SELECT id, status, row_version, key_enc, driver_state FROM engine ORDER BY id"),
            orch.rows("SELECT port, engine_name FROM port_lease ORDER BY port"),
            orch.rows("SELECT id FROM event ORDER BY id"))


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"] and body["error"]["request_id"]
    assert response.headers["x-request-id"] == body["error"]["request_id"]
    assert "Traceback" not in response.text
    return body


@pytest.fixture
def running(orch: Orchestrator) -> Orchestrator:
    api = orch.client("acme")
    assert api.post("/engines/provision", json={"user_id": "bob"}).status_code == 200
    return orch


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


BAD_REQUESTS = [
    ("POST", "/engines/provision", b"{not json"),
    ("POST", "/engines/provision", b"[1, 2]"),
    ("POST", "/engines/provision", b'{"user_id": "x", "colour": "red"}'),
    ("POST", "/engines/provision", b'{"user_id": 5}'),
    ("POST", "/engines/provision", b'{"engine_version": "v"}'),
    ("POST", "/engines/provision", b'{"user_id": "a/b"}'),
    ("POST", "/engines/provision", b'{"user_id": ""}'),
    ("POST", "/engines/provision", b'{"user_id": "a\\u0000b"}'),
    ("POST", "/engines/provision", b'{"user_id": "' + b"x" * 129 + b'"}'),
    ("POST", "/engines/bob/admit", b'{"auto_wake": "yes"}'),
    ("POST", "/engines/bob/admit", b'{"auto_provision": 1}'),
    ("POST", "/engines/bob/stop", b'{"force": true}'),
    ("GET", "/engines/a%2Fb", b""),
    ("GET", "/engines/a%00b", b""),
    ("GET", "/engines/%FF%FE", b""),
    ("GET", "/engines/" + "x" * 129, b""),
    ("GET", "/engines?status=dancing", b""),
    ("GET", "/engines?limit=0", b""),
    ("GET", "/engines?limit=lots", b""),
    ("GET", "/engines?cursor=%%%", b""),
    ("GET", "/engines?colour=red", b""),
    ("GET", "/engines/bob/events?limit=100000", b""),
    # Found by an outside run as 500s: deep nesting, a digit int() refuses, a huge cursor.
    ("POST", "/engines/provision", b'{"user_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("POST", "/engines/provision", b"[" * 100_000 + b"]" * 100_000),
    ("POST", "/engines/bob/admit", b'{"auto_wake": ' + b'{"a":' * 20_000 + b"1" + b"}" * 20_001),
    ("POST", "/engines/bob/admit", b'{"colour": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("GET", "/engines?limit=%C2%B2", b""),  # '²'
    ("GET", "/engines?limit=%D9%A3", b""),  # Arabic-Indic three
    ("GET", "/engines/bob/events?limit=%C2%B2", b""),
    ("GET", "/engines?cursor=" + cursor("e:" + "9" * 30), b""),
    ("GET", "/engines?cursor=" + cursor("e:9223372036854775808"), b""),
    ("GET", "/engines/bob/events?cursor=" + cursor("e:" + "9" * 30), b""),
    ("GET", "/engines?limit=1&limit=2", b""),
    ("GET", "/engines/bob", b'{"x": 1}'),
    ("POST", "/engines/bob/admit", b'{"auto_wake": null}'),
    ("GET", "/engines/%F0%9F", b""),  # a cut UTF-8 sequence
    ("GET", "/engines/a%2fb/events", b""),
]


@pytest.mark.parametrize("method,path,body", BAD_REQUESTS)
def test_invalid_request(running: Orchestrator, method: str, path: str, body: bytes) -> None:
    before = snapshot(running)
    response = running.client("acme").request(method, path, content=body)
    assert_error(response, 400, "INVALID_REQUEST")
    assert snapshot(running) == before


def test_body_over_64_kib(running: Orchestrator) -> None:
    before = snapshot(running)
    body = b'{"user_id": "' + b"x" * (65 * 1024) + b'"}'
    assert_error(running.client("acme").post("/engines/provision", content=body), 400,
                 "INVALID_REQUEST")
    assert snapshot(running) == before


@pytest.mark.parametrize("key", [None, "", "orch_pk_wrong"])
def test_unauthorized(running: Orchestrator, key: str | None) -> None:
    before = snapshot(running)
    headers = {} if key is None else {"X-Platform-Key": key}
    for method, path in [("GET", "/engines"), ("POST", "/engines/bob/stop"),
                         ("DELETE", "/engines/bob"), ("POST", "/engines/provision")]:
        response = httpx.request(method, running.url + path, headers=headers, trust_env=False)
        assert_error(response, 401, "UNAUTHORIZED")
    assert snapshot(running) == before


def test_not_found_codes(running: Orchestrator) -> None:
    api = running.client("acme")
    before = snapshot(running)
    for method, path in [("GET", "/engines/nobody"), ("DELETE", "/engines/nobody"),
                         ("POST", "/engines/nobody/start"), ("POST", "/engines/nobody/stop"),
                         ("POST", "/engines/nobody/rotate-key")]:
        assert_error(api.request(method, path), 404, "ENGINE_NOT_FOUND")
    assert_error(api.get("/nope"), 404, "NOT_FOUND")
    assert_error(api.get("/engines/bob/teleport"), 404, "NOT_FOUND")
    assert_error(api.get("/engines/"), 404, "NOT_FOUND")  # not a redirect
    assert_error(api.post("/engines/bob/stop/"), 404, "NOT_FOUND")
    response = api.put("/engines/bob")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert "DELETE" in response.headers["allow"]
    assert snapshot(running) == before


def test_conflicts(running: Orchestrator) -> None:
    api = running.client("acme")
    before = snapshot(running)
    assert_error(api.post("/engines/provision", json={"user_id": "bob"}), 409, "ENGINE_ALREADY_EXISTS")
    assert_error(api.post("/engines/bob/start"), 409, "ENGINE_ALREADY_RUNNING")
    assert snapshot(running) == before
    assert api.post("/engines/bob/stop").status_code == 200
    before = snapshot(running)
    assert_error(api.post("/engines/bob/stop"), 409, "ENGINE_NOT_RUNNING")
    assert_error(api.post("/engines/bob/rotate-key"), 409, "ENGINE_NOT_RUNNING")
    assert snapshot(running) == before


def test_quota_exceeded(orch: Orchestrator) -> None:
    orch.product("small", max_engines=1)
    api = orch.client("small")
    assert api.post("/engines/provision", json={"user_id": "one"}).status_code == 200
    before = snapshot(orch)
    assert_error(api.post("/engines/provision", json={"user_id": "two"}), 429, "QUOTA_EXCEEDED")
    assert_error(api.post("/engines/two/admit", json={"auto_provision": True}), 429,
                 "QUOTA_EXCEEDED")
    assert snapshot(orch) == before


def test_rate_limited_with_retry_after(orch: Orchestrator) -> None:
    orch.product("slow", rpm=3)
    api = orch.client("slow")
    answers = [api.post("/engines/x/admit") for _ in range(3)]
    assert all(a.json() == {"admitted": False, "reason": "engine_not_found", "status": None}
               for a in answers)
    before = snapshot(orch)
    response = api.post("/engines/x/admit", json={"auto_provision": True})
    assert_error(response, 429, "RATE_LIMITED")
    assert 1 <= int(response.headers["retry-after"]) <= 20
    assert snapshot(orch) == before  # not provisioned


def test_port_exhaustion_leaves_nothing(tmp_path: Path) -> None:
    orch = Orchestrator(tmp_path, ports=1).start()
    try:
        orch.product("acme")
        api = orch.client("acme")
        assert api.post("/engines/provision", json={"user_id": "first"}).status_code == 200
        before = snapshot(orch)
        assert_error(api.post("/engines/provision", json={"user_id": "second"}), 503,
                     "PORT_EXHAUSTION")
        assert_error(api.post("/engines/third/admit", json={"auto_provision": True}), 503,
                     "PORT_EXHAUSTION")
        rows, ports, _ = snapshot(orch)
        assert (rows, ports) == before[:2]  # no row, no port (the audit log records the attempt)
        assert sorted(p.name for p in (orch.state_dir / "brains").iterdir()) == \
            [orch.rows("SELECT name FROM engine")[0][0]]
    finally:
        orch.close()


def test_boot_timeout_keeps_failed_engine(tmp_path: Path) -> None:
    orch = Orchestrator(tmp_path, env={"ORCH_BOOT_TIMEOUT_S": "1.5", "ORCH_MAX_RESTARTS": "0"}).start()
    try:
        orch.product("acme")
        api = orch.client("acme")
        response = api.post("/engines/provision",
                            json={"user_id": "stuck", "engine_version": "ref+fault-never-healthy"})
        assert_error(response, 504, "BOOT_TIMEOUT")
        engine = api.get("/engines/stuck").json()
        assert engine["status"] == "failed" and engine["failure_reason"] == "boot_timeout"
        row = orch.engine_row("stuck")
        import json as _json
        assert proc_state(_json.loads(row["driver_state"]).get("pid") or 0) == "gone"
        assert (orch.state_dir / "brains" / row["name"]).is_dir()  # the brain is kept
        denied = api.post("/engines/stuck/admit").json()
        assert denied == {"admitted": False, "reason": "engine_unhealthy", "status": "failed"}
    finally:
        orch.close()


def test_failures_below_the_api_name_their_cause(tmp_path: Path) -> None:
    """An upgrade to a version that crashes says so, in the answer and the audit reason. A
    driver_state emptied behind the driver's back makes the local driver trip over it (a
    bug's kind of error, not a domain error): the driver's edge wraps it, so the answer is the
    contract's 502 DRIVER_FAILED, not a 500, and the engine is failed, not left starting."""
    orch = Orchestrator(tmp_path, env={"ORCH_MAX_RESTARTS": "0"}).start()
    try:
        orch.product("acme")
        api = orch.client("acme")
        assert api.post("/engines/provision", json={"user_id": "bob"}).status_code == 200
        old, bad = api.get("/engines/bob").json()["engine_version"], "ref-2+fault-crash"
        body = assert_error(api.post("/engines/bob/upgrade", json={"engine_version": bad}),
                            502, "UPGRADE_FAILED")
        assert "crashed while booting" in body["error"]["message"]
        assert "healthy within" not in body["error"]["message"]
        last = api.get("/engines/bob/events").json()["events"][0]
        assert (last["event"], last["reason"]) == ("upgrade_rolled_back", f"crashed; {bad} -> {old}")

        assert api.post("/engines/bob/stop").status_code == 200
        orch.execute("UPDATE engine SET driver_state = '{}', row_version = row_version + 1 "
                     "WHERE user_id = 'bob'")
        body = assert_error(api.post("/engines/bob/start"), 502, "DRIVER_FAILED")
        assert "local driver's launch failed" in body["error"]["message"]
        engine = api.get("/engines/bob").json()
        assert (engine["status"], engine["failure_reason"]) == ("failed", "driver_failed")
    finally:
        orch.close()


def test_database_unavailable(tmp_path: Path) -> None:
    orch = Orchestrator(tmp_path, env={"ORCH_DB_TIMEOUT_S": "0.3"}).start()
    try:
        orch.product("acme")
        api = orch.client("acme")
        api.get("/engines")  # warm the product cache, so the write is what fails
        conn = orch.db()
        cursor = conn.cursor()
        if orch.pg_url:
            cursor.execute("BEGIN")
            cursor.execute("LOCK TABLE product, engine, rate_limit IN ACCESS EXCLUSIVE MODE")
        else:
            cursor.execute("BEGIN EXCLUSIVE")
        try:
            response = api.post("/engines/provision", json={"user_id": "dbless"})
            assert_error(response, 503, "SCHEDULER_UNAVAILABLE")
        finally:
            cursor.execute("ROLLBACK")
            conn.close()
        assert orch.rows("SELECT * FROM engine") == []
        assert orch.rows("SELECT * FROM port_lease") == []
    finally:
        orch.close()


def test_internal_error_is_json_without_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bug answers 500 INTERNAL with the request id, and the details go to the log only."""
    import asyncio

    from app.api import app as app_module
    from app.config import Settings

    async def scenario() -> httpx.Response:
        settings = Settings.from_env({"ORCH_STATE_DIR": str(tmp_path), "ORCH_ENGINE_USER": OWN_USER,
                                      "ORCH_DATABASE_URL": f"sqlite:///{tmp_path / 'o.db'}"})
        application = app_module.OrchestratorApp(settings, run_reconciler=False)
        await application.startup()
        try:
            from app import products, registry
            _, key = products.create("p")

            def boom(*_a, **_k):
                raise RuntimeError("secret internals")

            assert application.services is not None
            monkeypatch.setattr(registry, "find_engine", boom)
            transport = httpx.ASGITransport(app=application.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.get("/engines/u", headers={"X-Platform-Key": key,
                                                               "X-Request-ID": "req-42"})
        finally:
            await application.shutdown()

    response = asyncio.run(scenario())
    body = assert_error(response, 500, "INTERNAL")
    assert body["error"]["request_id"] == "req-42" and "secret internals" not in response.text


def test_request_id_is_echoed(running: Orchestrator) -> None:
    api = running.client("acme")
    assert api.get("/engines/bob", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(api.get("/engines/bob").headers["x-request-id"]) >= 16


def test_two_platform_keys_are_refused(running: Orchestrator) -> None:
    key = running.keys["acme"]
    before = snapshot(running)
    for keys in ([key, key], [key, "orch_pk_other"], ["orch_pk_other", key]):
        response = httpx.request("POST", running.url + "/engines/bob/stop", trust_env=False,
                                 headers=[("X-Platform-Key", k) for k in keys])
        assert_error(response, 400, "INVALID_REQUEST")
    assert snapshot(running) == before


def test_options_on_provision_is_not_read_as_a_user(running: Orchestrator) -> None:
    response = running.client("acme").options("/engines/provision")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers["allow"] == "POST"
    engine = running.client("acme").get("/engines/provision")  # a user may be called that
    assert_error(engine, 404, "ENGINE_NOT_FOUND")


# ---- the request head: size and time limits (app/api/server.py) ------------------------------


def raw_request(orch: Orchestrator, head: bytes, timeout: float = 10.0) -> bytes:
    """Sends `head` on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", orch.port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before the whole head is sent
        return read_until_closed(sock)


def test_a_head_over_64_kib_is_refused(running: Orchestrator) -> None:
    key = running.keys["acme"].encode()
    big = b"GET /engines HTTP/1.1\r\nHost: t\r\nX-Platform-Key: " + key + b"\r\nX-Big: " + \
        b"a" * (65 * 1024) + b"\r\n\r\n"
    assert raw_request(running, big).startswith(b"HTTP/1.1 431 ")
    many = b"GET /engines HTTP/1.1\r\nHost: t\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(100_000)) + b"\r\n"
    assert raw_request(running, many).startswith(b"HTTP/1.1 431 ")
    # just under the limit is served
    fits = b"GET /engines HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Platform-Key: " + key + \
        b"\r\nX-Big: " + b"a" * (60 * 1024) + b"\r\n\r\n"
    assert raw_request(running, fits).startswith(b"HTTP/1.1 200 ")


def test_a_connection_without_a_whole_head_is_closed(tmp_path: Path) -> None:
    orch = Orchestrator(tmp_path, env={"ORCH_HEAD_TIMEOUT_S": "1"}).start()
    try:
        socks = [socket.create_connection(("127.0.0.1", orch.port), timeout=10) for _ in range(3)]
        socks[0].sendall(b"GET /engines HTTP/1.1\r\nHost: t\r\nX-Slow: ")  # and nothing more
        socks[1].sendall(b"G")
        # socks[2] sends nothing at all
        started = time.monotonic()
        for sock in socks:
            with sock:
                assert read_until_closed(sock) == b""  # closed by the server, not answered
        assert time.monotonic() - started < 8
        # a whole head in time is answered, and the body may take longer than the head limit
        with socket.create_connection(("127.0.0.1", orch.port), timeout=10) as sock:
            sock.sendall(b"POST /engines/provision HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\n{")
            time.sleep(1.5)
            sock.sendall(b"}")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 401 ")
    finally:
        orch.close()
