"""Every error code of the spec: status, code, and that nothing changed."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.engines import proc_state
from tests.harness import OWN_USER, Orchestrator


def snapshot(orch: Orchestrator) -> tuple[list, list, list]:
    """Everything a refused request must leave alone (audit events included)."""
    return (orch.rows("SELECT id, status, version, key_enc, driver_state FROM engine ORDER BY id"),
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
            from app import products
            _, key = products.create("p")

            def boom(*_a, **_k):
                raise RuntimeError("secret internals")

            monkeypatch.setattr(application.services.lifecycle, "get", boom)
            transport = httpx.ASGITransport(app=application)
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
