"""The endpoints: parse and check the request, call the lifecycle, shape the answer."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app import errors, naming, registry, states
from app.admit import Admitter
from app.api.request import Request
from app.lifecycle import Lifecycle, ProductRef
from app.registry import Engine

Answer = tuple[int, dict[str, Any]]


@dataclass
class Services:
    lifecycle: Lifecycle
    admitter: Admitter


Handler = Callable[[Services, Request, ProductRef, str | None], Awaitable[Answer]]

USER = object()  # marks the user_id segment in a route pattern


# ---- handlers ------------------------------------------------------------------------------


async def provision(svc: Services, req: Request, product: ProductRef, _: str | None) -> Answer:
    body = await req.json_fields({"user_id": str, "engine_version": str}, required=("user_id",))
    user_id = body["user_id"]
    _check_user_id(user_id)
    version = body.get("engine_version")
    if version is not None and not (1 <= len(version) <= 256 and version.isprintable()):
        raise errors.invalid("engine_version must be 1 to 256 printable characters")
    engine, api_key = await svc.lifecycle.provision(product, user_id, version)
    return 200, {**engine_json(engine), "api_key": api_key}


async def get_engine(svc: Services, req: Request, product: ProductRef, user_id: str | None) -> Answer:
    await req.no_body_fields()
    return 200, engine_json(svc.lifecycle.get(product, user_id))


async def destroy(svc: Services, req: Request, product: ProductRef, user_id: str | None) -> Answer:
    await req.no_body_fields()
    await svc.lifecycle.destroy(product, user_id)
    return 200, {"user_id": user_id, "destroyed": True}


async def start(svc: Services, req: Request, product: ProductRef, user_id: str | None) -> Answer:
    await req.no_body_fields()
    return 200, engine_json(await svc.lifecycle.start(product, user_id))


async def stop(svc: Services, req: Request, product: ProductRef, user_id: str | None) -> Answer:
    await req.no_body_fields()
    return 200, engine_json(await svc.lifecycle.stop(product, user_id))


async def rotate_key(svc: Services, req: Request, product: ProductRef, user_id: str | None) -> Answer:
    await req.no_body_fields()
    engine, api_key = await svc.lifecycle.rotate_key(product, user_id)
    return 200, {**engine_json(engine), "api_key": api_key}


async def admit(svc: Services, req: Request, product: ProductRef, user_id: str | None) -> Answer:
    body = await req.json_fields({"auto_provision": bool, "auto_wake": bool})
    result = await svc.admitter.admit(product, user_id, body.get("auto_provision", False),
                                      body.get("auto_wake", False))
    return 200, result


async def list_engines(svc: Services, req: Request, product: ProductRef, _: str | None) -> Answer:
    await req.no_body_fields()
    query = req.query({"status", "limit", "cursor"})
    status = query.get("status")
    if status is not None and status not in states.STATES:
        raise errors.invalid(f"status must be one of {', '.join(states.STATES)}")
    limit = _limit(query.get("limit"), default=100)
    after = _decode_cursor(query.get("cursor"))
    rows = registry.list_engines(product.id, status, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = _encode_cursor(rows[-1].id) if more else None
    return 200, {"engines": [engine_json(e) for e in rows], "next_cursor": cursor}


async def events(svc: Services, req: Request, product: ProductRef, user_id: str | None) -> Answer:
    await req.no_body_fields()
    query = req.query({"limit"})
    rows = registry.events_for(product.id, user_id, _limit(query.get("limit"), default=100))
    return 200, {"events": [event_json(e) for e in rows]}


# ---- the table: (method, pattern) -> handler --------------------------------------------

ROUTES: list[tuple[str, tuple[object, ...], Handler]] = [
    ("POST", ("engines", "provision"), provision),
    ("GET", ("engines",), list_engines),
    ("GET", ("engines", USER), get_engine),
    ("DELETE", ("engines", USER), destroy),
    ("POST", ("engines", USER, "start"), start),
    ("POST", ("engines", USER, "stop"), stop),
    ("POST", ("engines", USER, "rotate-key"), rotate_key),
    ("POST", ("engines", USER, "admit"), admit),
    ("GET", ("engines", USER, "events"), events),
]


_BY_LENGTH: dict[int, list[tuple[str, tuple[object, ...], Handler]]] = {}
for _route in ROUTES:
    _BY_LENGTH.setdefault(len(_route[1]), []).append(_route)

# The literal segments each position can hold, by path length: every other segment is a
# user id as far as routing goes, so the match of a path depends only on its "shape" (the
# path with user ids masked), and there are few shapes: matches are memoised by shape.
_LITERALS: dict[int, list[frozenset[str]]] = {
    length: [frozenset(p[i] for _, p, _ in routes if p[i] is not USER) for i in range(length)]
    for length, routes in _BY_LENGTH.items()}
_MATCHES: dict[tuple[str | None, ...], tuple[dict[str, Handler], dict[str, int | None],
                                             dict[str, str]]] = {}

Match = tuple[dict[str, Handler], dict[str, str | None], dict[str, str]]


def route_label(pattern: tuple[object, ...]) -> str:
    return "/" + "/".join("{user_id}" if p is USER else str(p) for p in pattern)


def match(segments: list[str]) -> Match:
    """By method, for a path: the handler, the user_id segment (None when the route has
    none), and the route's label for metrics (a pattern: user ids never become labels)."""
    literals = _LITERALS.get(len(segments))
    if literals is None:
        return {}, {}, {}
    shape = tuple(s if s in allowed else None for s, allowed in zip(segments, literals))
    found = _MATCHES.get(shape)
    if found is None:
        found = _MATCHES[shape] = _match_shape(shape)
    handlers, user_at, labels = found
    users = {m: None if i is None else segments[i] for m, i in user_at.items()}
    return handlers, users, labels


def _match_shape(shape: tuple[str | None, ...]) -> tuple[dict[str, Handler], dict[str, int | None],
                                                          dict[str, str]]:
    found: dict[str, Handler] = {}
    user_at: dict[str, int | None] = {}
    labels: dict[str, str] = {}
    for method, pattern, handler in _BY_LENGTH.get(len(shape), ()):
        at = None
        for i, (want, got) in enumerate(zip(pattern, shape)):
            if want is USER:
                at = i
            elif want != got:
                break
        else:
            # A literal route ("provision") wins over the same path read as a user id.
            if method not in found:
                found[method] = handler
                user_at[method] = at
                labels[method] = route_label(pattern)
    return found, user_at, labels


# ---- shapes -----------------------------------------------------------------------------


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def engine_json(engine: Engine) -> dict[str, Any]:
    return {
        "user_id": engine.user_id,
        "status": engine.status,
        "url": engine.url,
        "engine_version": engine.engine_version,
        "created_at": iso(engine.created_at),
        "updated_at": iso(engine.updated_at),
        "last_admit_at": iso(engine.last_admit_at),
        "restarts": engine.restarts,
        "failure_reason": engine.failure_reason,
    }


def event_json(event: registry.Event) -> dict[str, Any]:
    return {"id": event.id, "at": iso(event.at), "event": event.event, "from": event.from_status,
            "to": event.to_status, "reason": event.reason, "request_id": event.request_id}


def _check_user_id(user_id: object) -> None:
    problem = naming.user_id_problem(user_id)
    if problem:
        raise errors.invalid(problem)


def _limit(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise errors.invalid("limit must be a whole number from 1 to 1000")
    return int(raw)


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"e:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(raw: str | None) -> int:
    if raw is None:
        return 0
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        prefix, _, value = text.partition(":")
        if prefix != "e" or not value.isdigit():
            raise ValueError
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.invalid("cursor is not one this API gave out") from None
