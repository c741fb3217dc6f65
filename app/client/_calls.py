"""Every endpoint as a `Call`: what to send and how to read the answer.

The sync and async clients only differ in how they send a Call, so paths, bodies and parsing
live here, once.
"""

from __future__ import annotations

import json as json_module
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from app.client._errors import UnexpectedResponse, error_from_response
from app.client._models import (
    Admission,
    Engine,
    EnginePage,
    Event,
    EventPage,
    Health,
    ProvisionedEngine,
    Rollout,
    Snapshot,
    SnapshotPage,
)
from app.client._routes import BY_NAME

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str  # relative to the client's base_url; user ids already percent-encoded
    read: Callable[[httpx.Response], T]
    json: dict[str, Any] | None = None
    content: bytes | None = None  # a raw body (a tar archive)
    params: dict[str, str | int] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    also_ok: tuple[int, ...] = ()  # error statuses that are answers here (readyz's 503)


def finish(call: Call[T], response: httpx.Response) -> T:
    """The call's result, or the error the response stands for."""
    if response.is_error and response.status_code not in call.also_ok:
        raise error_from_response(response)
    try:
        return call.read(response)
    except (ValueError, KeyError, TypeError) as exc:  # JSON or shape not the API's
        raise UnexpectedResponse(response.status_code, "UNEXPECTED_RESPONSE",
                                 f"cannot read the answer: {exc!r}",
                                 response.headers.get("x-request-id"), response=response) from exc


def _segment(user_id: str) -> str:
    """The user id as one percent-encoded path segment."""
    segment = quote(user_id, safe="")
    if segment in (".", ".."):
        # httpx (like browsers) drops dot segments from a path, so "/engines/.." would become
        # "/"; encoded dots reach the server, which decodes them back to the user id.
        segment = segment.replace(".", "%2E")
    return segment


def _headers(request_id: str | None) -> dict[str, str]:
    # The server echoes X-Request-ID and writes it to its log and the audit events.
    return {"X-Request-ID": request_id} if request_id else {}


def _json(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    if not isinstance(body, dict):
        raise TypeError(f"expected a JSON object, got {type(body).__name__}")
    return body


# ---- the endpoints: method and path from the endpoint table (its copy, app/client/_routes.py) -


def _call(name: str, read: Callable[[httpx.Response], T], user_id: str | None = None, *,
          json: dict[str, Any] | None = None, params: dict[str, str | int] | None = None,
          request_id: str | None = None, rollout_id: int | None = None,
          content: bytes | None = None) -> Call[T]:
    endpoint = BY_NAME[name]
    path = endpoint.path
    if user_id is not None:
        path = path.replace("{user_id}", _segment(user_id))
    if rollout_id is not None:
        path = path.replace("{rollout_id}", str(int(rollout_id)))
    headers = _headers(request_id)
    if content is not None:
        headers["Content-Type"] = "application/x-tar"
    return Call(endpoint.method, path, read, json=json, content=content, params=params or None,
                headers=headers, also_ok=endpoint.also_ok)


def _present(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def provision(user_id: str, engine_version: str | None, request_id: str | None,
              from_snapshot: tuple[str, str] | None = None) -> Call[ProvisionedEngine]:
    # engine_version omitted: the server's ORCH_ENGINE_IMAGE; from_snapshot: (user, snapshot id)
    source = None if from_snapshot is None else \
        {"user_id": from_snapshot[0], "snapshot_id": from_snapshot[1]}
    return _call("provision", lambda r: ProvisionedEngine.from_json(_json(r)),
                 json=_present(user_id=user_id, engine_version=engine_version, from_snapshot=source),
                 request_id=request_id)


def get(user_id: str, request_id: str | None) -> Call[Engine]:
    return _call("get", lambda r: Engine.from_json(_json(r)), user_id, request_id=request_id)


def admit(user_id: str, auto_provision: bool, auto_wake: bool,
          request_id: str | None, wait: bool = True) -> Call[Admission]:
    body: dict[str, Any] = {"auto_provision": auto_provision, "auto_wake": auto_wake}
    if not wait:  # sent only when asked for: older servers refuse unknown fields
        body["wait"] = False
    return _call("admit", lambda r: Admission.from_json(_json(r), user_id), user_id,
                 json=body, request_id=request_id)


def start(user_id: str, request_id: str | None) -> Call[Engine]:
    return _call("start", lambda r: Engine.from_json(_json(r)), user_id, request_id=request_id)


def stop(user_id: str, request_id: str | None) -> Call[Engine]:
    return _call("stop", lambda r: Engine.from_json(_json(r)), user_id, request_id=request_id)


def rotate_key(user_id: str, request_id: str | None) -> Call[ProvisionedEngine]:
    return _call("rotate_key", lambda r: ProvisionedEngine.from_json(_json(r)), user_id,
                 request_id=request_id)


def upgrade(user_id: str, engine_version: str, request_id: str | None) -> Call[Engine]:
    return _call("upgrade", lambda r: Engine.from_json(_json(r)), user_id,
                 json={"engine_version": engine_version}, request_id=request_id)


def snapshot(user_id: str, request_id: str | None) -> Call[Snapshot]:
    return _call("snapshot", lambda r: Snapshot.from_json(_json(r)), user_id, request_id=request_id)


def snapshots(user_id: str, limit: int | None, cursor: str | None,
              request_id: str | None) -> Call[SnapshotPage]:
    return _call("snapshots", lambda r: SnapshotPage.from_json(_json(r)), user_id,
                 params=_present(limit=limit, cursor=cursor), request_id=request_id)


def restore(user_id: str, snapshot_id: str, request_id: str | None) -> Call[Engine]:
    return _call("restore", lambda r: Engine.from_json(_json(r)), user_id,
                 json={"snapshot_id": snapshot_id}, request_id=request_id)


def export_brain(user_id: str, snapshot_id: str | None, request_id: str | None) -> Call[bytes]:
    return _call("export_brain", lambda r: r.content, user_id,
                 params=_present(snapshot_id=snapshot_id), request_id=request_id)


def import_brain(user_id: str, archive: bytes, request_id: str | None) -> Call[Snapshot]:
    return _call("import_brain", lambda r: Snapshot.from_json(_json(r)), user_id,
                 content=archive, request_id=request_id)


def destroy(user_id: str, request_id: str | None) -> Call[None]:
    return _call("destroy", _read_destroyed, user_id, request_id=request_id)


def list_engines(status: str | None, limit: int | None, cursor: str | None,
                 request_id: str | None) -> Call[EnginePage]:
    return _call("list", lambda r: EnginePage.from_json(_json(r)),
                 params=_present(status=status, limit=limit, cursor=cursor), request_id=request_id)


def events(user_id: str, limit: int | None, cursor: str | None,
           request_id: str | None) -> Call[EventPage]:
    return _call("events", lambda r: EventPage.from_json(_json(r)), user_id,
                 params=_present(limit=limit, cursor=cursor), request_id=request_id)


def watch(user_id: str, latest: int | None) -> Call[None]:
    """events?follow=true: read as a stream by `watch()`, line by line (`sse_event`)."""
    params: dict[str, str | int] = {"follow": "true", **_present(limit=latest)}
    return _call("events", lambda r: None, user_id, params=params)


def rollout_events(rollout_id: int, limit: int | None, cursor: str | None,
                   request_id: str | None) -> Call[EventPage]:
    return _call("rollout_events", lambda r: EventPage.from_json(_json(r)),
                 params=_present(limit=limit, cursor=cursor), request_id=request_id,
                 rollout_id=rollout_id)


def watch_rollout(rollout_id: int, latest: int | None) -> Call[None]:
    params: dict[str, str | int] = {"follow": "true", **_present(limit=latest)}
    return _call("rollout_events", lambda r: None, params=params, rollout_id=rollout_id)


def sse_event(line: str) -> Event | None:
    """The Event of one `data:` line of the stream; None for the other lines (id, comments)."""
    if not line.startswith("data:"):
        return None
    return Event.from_json(json_module.loads(line[len("data:"):].strip()))


def start_rollout(to_version: str, from_version: str | None, batch_size: int | None,
                  max_failures: int | None, request_id: str | None) -> Call[Rollout]:
    body = _present(to_version=to_version, from_version=from_version, batch_size=batch_size,
                    max_failures=max_failures)
    return _call("start_rollout", lambda r: Rollout.from_json(_json(r)), json=body,
                 request_id=request_id)


def rollouts(request_id: str | None) -> Call[tuple[Rollout, ...]]:
    return _call("rollouts", lambda r: tuple(Rollout.from_json(x) for x in _json(r)["rollouts"]),
                 request_id=request_id)


def rollout(rollout_id: int, request_id: str | None) -> Call[Rollout]:
    return _call("rollout", lambda r: Rollout.from_json(_json(r)), rollout_id=rollout_id,
                 request_id=request_id)


def pause_rollout(rollout_id: int, request_id: str | None) -> Call[Rollout]:
    return _call("pause_rollout", lambda r: Rollout.from_json(_json(r)), rollout_id=rollout_id,
                 request_id=request_id)


def resume_rollout(rollout_id: int, request_id: str | None) -> Call[Rollout]:
    return _call("resume_rollout", lambda r: Rollout.from_json(_json(r)), rollout_id=rollout_id,
                 request_id=request_id)


def abort_rollout(rollout_id: int, request_id: str | None) -> Call[Rollout]:
    return _call("abort_rollout", lambda r: Rollout.from_json(_json(r)), rollout_id=rollout_id,
                 request_id=request_id)


def healthz() -> Call[Health]:
    return _call("healthz", lambda r: Health.from_json(_json(r), ok=True))


def readyz() -> Call[Health]:
    # 503 is readyz's way of saying "not ready" (the table's also_ok), with its own body.
    return _call("readyz", lambda r: Health.from_json(_json(r), ok=r.status_code == 200))


def metrics() -> Call[str]:
    return _call("metrics", lambda r: r.text)


def openapi() -> Call[dict[str, Any]]:
    return _call("openapi", _json)


# The builder of each endpoint of the table (tests check that none is missing).
BUILDERS: dict[str, Callable[..., Call[Any]]] = {
    "provision": provision, "list": list_engines, "get": get, "destroy": destroy,
    "start": start, "stop": stop, "rotate_key": rotate_key, "admit": admit, "events": events,
    "upgrade": upgrade, "snapshot": snapshot, "snapshots": snapshots, "restore": restore,
    "export_brain": export_brain, "import_brain": import_brain,
    "start_rollout": start_rollout, "rollouts": rollouts,
    "rollout": rollout, "pause_rollout": pause_rollout, "resume_rollout": resume_rollout,
    "abort_rollout": abort_rollout, "rollout_events": rollout_events,
    "healthz": healthz, "readyz": readyz, "metrics": metrics, "openapi": openapi,
}


def _read_destroyed(response: httpx.Response) -> None:
    if _json(response).get("destroyed") is not True:
        raise ValueError("the server did not confirm the destroy")


# ---- what both clients pass to httpx --------------------------------------------------------

# Provision, start and admit may wait for an engine to boot (ORCH_BOOT_TIMEOUT_S, 60 s by
# default) and stop waits out ORCH_STOP_GRACE_S (30 s): the read timeout must outlast both.
DEFAULT_TIMEOUT = httpx.Timeout(90.0, connect=5.0)


def http_options(base_url: str, platform_key: str, timeout: float | httpx.Timeout,
                 headers: dict[str, str] | None, trust_env: bool,
                 verify: ssl.SSLContext | str | bool) -> dict[str, Any]:
    """The keyword arguments of httpx.Client / httpx.AsyncClient, the transport aside."""
    return {"base_url": base_url,
            "headers": {**(headers or {}), "X-Platform-Key": platform_key},
            "timeout": timeout, "trust_env": trust_env, "verify": verify}
