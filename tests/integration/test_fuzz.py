"""Schema-driven fuzzing of every endpoint in /openapi.json (hypothesis, in-process ASGI).

Requests come from the OpenAPI document: every path and method, with user ids, bodies and
query strings that are sometimes valid and mostly hostile. The product has a quota of 0, so no
request may change anything. Invariants: never a 5xx, only the documented error codes, the
JSON error shape, and the registry and the filesystem exactly as before.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import products, registry
from app.api.app import OrchestratorApp
from app.config import Settings
from tests.harness import OWN_USER

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))

ODD_USER_IDS = ["..", ".", "../../etc/passwd", "a/b", "%2F", "%2e%2e", "a\x00b", "\n", " ",
                "x" * 129, "x" * 128, "ü" * 64, "🙂", "CON", "nul", "-", "$(id)", "'; DROP TABLE engine;--",
                "provision", "%", "a%2Fb", "\u202e", "\t"]

user_ids = st.one_of(st.sampled_from(ODD_USER_IDS), st.text(min_size=0, max_size=140))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=40),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=3),
                           max_leaves=6)


def _document() -> dict:
    from app.api.openapi import document

    return document()


OPERATIONS = [(path, method.upper(), op) for path, item in _document()["paths"].items()
              for method, op in item.items()]
DOCUMENTED = {400, 401, 404, 405, 409, 429, 503, 504, 200}


@st.composite
def bodies(draw: st.DrawFn, op: dict) -> bytes:
    schema = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return b""
    if choice == 1:
        return draw(st.binary(max_size=64))
    if choice == 2 or not schema:
        return json.dumps(draw(json_values)).encode()
    fields = {}
    for name in schema.get("properties", {}):
        if draw(st.booleans()):
            fields[name] = draw(json_values | user_ids | st.booleans())
    if draw(st.booleans()):
        fields[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return json.dumps(fields).encode()


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    path, method, op = draw(st.sampled_from(OPERATIONS))
    if draw(st.integers(0, 9)) == 0:  # now and then, a method the path does not have
        method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]))
    user = draw(user_ids)
    encoded = quote(user, safe="") if draw(st.booleans()) else quote(user, safe="/%")
    url = path.replace("{user_id}", encoded)
    params = {}
    for param in op.get("parameters", []):
        if param["in"] == "query" and draw(st.booleans()):
            params[param["name"]] = draw(st.text(max_size=12) | st.integers(-5, 5000).map(str))
    if draw(st.integers(0, 9)) == 0:
        params[draw(st.text(min_size=1, max_size=6))] = "x"
    return method, url, draw(bodies(op)), params


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fuzz")
    env = {"ORCH_STATE_DIR": str(tmp / "state"),
           "ORCH_DATABASE_URL": f"sqlite:///{tmp / 'state' / 'orch.db'}",
           "ORCH_PORT_RANGE": "39000-39001", "ORCH_ENGINE_USER": OWN_USER}
    if os.environ.get("ORCH_TEST_DB") == "postgres":
        from tests.harness import _fresh_postgres_database

        env["ORCH_DATABASE_URL"] = _fresh_postgres_database()
    application = OrchestratorApp(Settings.from_env(env), run_reconciler=False)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(application.startup())
    _, key = products.create("fuzz", max_engines=0, rate_limit_rpm=1_000_000_000)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://fuzz")
    yield loop, client, key, tmp
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(application.shutdown())
    loop.close()


def _fingerprint(tmp: Path) -> tuple:
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                   if not p.name.startswith("orch.db"))
    counts = tuple(model.select().count() for model in (registry.Engine, registry.Event,
                                                         registry.PortLease))
    return counts, tuple(files)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(request=requests(), authorised=st.integers(0, 19))
def test_fuzz_every_endpoint(fuzz_app, request, authorised) -> None:  # type: ignore[no-untyped-def]
    loop, client, key, tmp = fuzz_app
    method, url, body, params = request
    headers = {"X-Platform-Key": key if authorised else "orch_pk_not-a-key"}
    before = _fingerprint(tmp)
    response = loop.run_until_complete(client.request(method, url, content=body, params=params,
                                                      headers=headers))
    assert response.status_code in DOCUMENTED, (method, url, body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"] and error["request_id"]
    assert _fingerprint(tmp) == before, (method, url, body, response.status_code)
