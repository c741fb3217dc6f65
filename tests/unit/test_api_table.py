"""The endpoint table is the one description of the API: the routes the server serves, the
OpenAPI document and the Python client must all say what it says."""

from __future__ import annotations

import dataclasses
import inspect

import msgspec
import pytest
from starlette.routing import Mount, Route

from app import states
from app.api import spec
from app.api.app import OrchestratorApp
from app.api.dispatch import ALL_HANDLERS as HANDLERS
from app.api.openapi import document
from app.client import AsyncClient, Client, _calls, _models
from app.config import Settings


def served_routes() -> dict[str, set[str]]:
    application = OrchestratorApp(Settings(), run_reconciler=False)
    found: dict[str, set[str]] = {}
    for route in application.app.routes:
        if isinstance(route, Route) and route.path != "/docs":
            found[route.path] = set(route.methods or ()) - {"HEAD"}
        else:
            assert isinstance(route, (Route, Mount)) and route.path.startswith("/docs")
    return found


def table_routes() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for endpoint in spec.ENDPOINTS:
        found.setdefault(endpoint.path, set()).add(endpoint.method)
    return found


def test_the_server_serves_the_table_and_nothing_else() -> None:
    assert served_routes() == table_routes()
    authed = {e.name for e in spec.ENDPOINTS if e.auth}
    assert set(HANDLERS) == authed


def test_provision_is_routed_before_the_user_id_routes() -> None:
    paths = [e.path for e in spec.ENDPOINTS]
    assert paths.index("/engines/provision") < paths.index("/engines/{user_id}")


def test_the_openapi_document_is_the_table() -> None:
    doc = document()
    documented = {path: {m.upper() for m in item} for path, item in doc["paths"].items()}
    assert documented == table_routes()
    for endpoint in spec.ENDPOINTS:
        op = doc["paths"][endpoint.path][endpoint.method.lower()]
        assert op["operationId"] == endpoint.name
        statuses = {int(s) for s in op["responses"]}
        assert statuses == {endpoint.ok, *endpoint.also_ok, *(spec.STATUS_BY_CODE[c] for c in endpoint.codes)}
        params = {p["name"] for p in op["parameters"]}
        query = {f.encode_name for f in msgspec.structs.fields(endpoint.query)} if endpoint.query else set()
        in_path = {p for p in ("user_id", "rollout_id") if "{" + p + "}" in endpoint.path}
        assert params == query | in_path
        assert ("requestBody" in op) == (endpoint.body is not None or endpoint.upload)
        assert ("security" in op) == endpoint.auth


def test_user_id_has_its_pattern_and_stop_and_destroy_say_503() -> None:
    doc = document()
    user = doc["paths"]["/engines/{user_id}"]["get"]["parameters"][0]
    assert user["schema"] == {"$ref": "#/components/schemas/UserId"}
    assert doc["components"]["schemas"]["UserId"]["pattern"].startswith("^[\\u0020-\\u002e\\u0030-")
    assert "503" in doc["paths"]["/engines/{user_id}/stop"]["post"]["responses"]
    assert "503" in doc["paths"]["/engines/{user_id}"]["delete"]["responses"]
    error = doc["components"]["schemas"]["ErrorAnswer"]
    assert error["required"] == ["error"]


def test_the_client_has_every_endpoint_and_sends_what_the_table_says() -> None:
    assert set(_calls.BUILDERS) == set(spec.BY_NAME)
    for name, build in _calls.BUILDERS.items():
        endpoint = spec.BY_NAME[name]
        args = {p: _example(p) for p in inspect.signature(build).parameters}
        call = build(**args)
        assert call.method == endpoint.method, name
        template = endpoint.path.replace("{user_id}", "u%20v").replace("{rollout_id}", "7")
        assert call.path == template, name
        if call.json is not None:
            assert endpoint.body is not None
            fields = {f.encode_name for f in msgspec.structs.fields(endpoint.body)}
            assert set(call.json) <= fields, name
            msgspec.convert(call.json, endpoint.body)  # what the client sends, the server takes
        else:
            assert endpoint.body is None or not endpoint.body_required, name
        if call.params:
            assert endpoint.query is not None
            assert set(call.params) <= {f.encode_name for f in msgspec.structs.fields(endpoint.query)}
        for client in (Client, AsyncClient):
            assert callable(getattr(client, name, None)), f"{client.__name__} lacks {name}"


def _example(parameter: str) -> object:
    return {"user_id": "u v", "engine_version": "v1", "auto_provision": True, "auto_wake": False,
            "status": "running", "limit": 5, "cursor": "ZToz", "request_id": None, "wait": False,
            "rollout_id": 7, "to_version": "v2", "from_version": "v1", "batch_size": 3,
            "max_failures": 1, "snapshot_id": "s-20261207142655123-0123abcd",
            "archive": b"tar", "from_snapshot": ("golden", "s-20261207142655123-0123abcd")}[parameter]


@pytest.mark.parametrize("answer,model", [
    (spec.Engine, _models.Engine), (spec.EnginePage, _models.EnginePage),
    (spec.Event, _models.Event), (spec.EventPage, _models.EventPage),
    (spec.Admission, _models.Admission), (spec.Snapshot, _models.Snapshot),
    (spec.SnapshotPage, _models.SnapshotPage)])
def test_the_client_models_read_every_field_the_server_sends(answer: type, model: type) -> None:
    sent = {f.encode_name for f in msgspec.structs.fields(answer)}
    renamed = {"from_status": "from", "to_status": "to"}
    read = {renamed.get(f.name, f.name) for f in dataclasses.fields(model)}
    assert sent == read


def test_engine_states_are_the_state_table() -> None:
    assert set(spec.EngineStatus.__args__) == set(states.STATES)


def test_query_integers_are_read_from_ascii_digits_only() -> None:
    from app.api.validate import Checks

    checks = Checks(spec.BY_NAME["list"])
    assert checks.query(b"limit=7").limit == 7
    for bad in (b"limit=%C2%B2", b"limit=1e3", b"limit=+5", b"limit=0x10", b"limit=" + b"9" * 30,
                b"limit=0", b"limit=1001", b"limit=5&limit=6", b"colour=red", b"limit"):
        with pytest.raises(Exception) as caught:  # the domain error, told by its code
            checks.query(bad)
        assert getattr(caught.value, "code", None) == "INVALID_REQUEST", bad
