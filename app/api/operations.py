"""The ASGI endpoint of one path of the table: picks the endpoint by method, authenticates,
checks the request against the endpoint's types, calls its handler and answers JSON."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app import errors
from app.api import rollouts
from app.api.auth import Authenticator
from app.api.handlers import HANDLERS, Call, Handler, Services, check_user_id
from app.api.spec import Endpoint
from app.api.validate import MAX_BODY, Checks

_encode = msgspec.json.Encoder().encode
_JSON = (b"content-type", b"application/json")


class Operations:
    def __init__(self, endpoints: list[Endpoint], auth: Authenticator, services: Any) -> None:
        """`services` is called for the Services once the lifespan has made them."""
        self.auth = auth
        self.services = services
        self.by_method: dict[str, tuple[Endpoint, Checks, Handler]] = {
            e.method: (e, Checks(e), ALL_HANDLERS[e.name]) for e in endpoints}
        if "GET" in self.by_method:  # Starlette routes HEAD with GET
            self.by_method["HEAD"] = self.by_method["GET"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint, checks, handler = self.by_method[scope["method"]]
        info = scope["orch"]
        info.route = endpoint.path
        key, length = _picked_headers(scope["headers"])
        product = self.auth.product(key)
        info.product = product.name
        user_id = scope["path_params"].get("user_id")
        if user_id is not None:
            info.user_id = check_user_id(user_id)
        query = checks.query(scope["query_string"])
        body = checks.body(await _read_body(receive, length))
        if user_id is None:  # provision names its user in the body
            info.user_id = getattr(body, "user_id", None)
        rollout_id = _rollout_id(scope["path_params"].get("rollout_id"))
        services: Services = self.services()
        result = await handler(services, Call(product, user_id or "", body, query, rollout_id))
        if isinstance(result, Response):  # a stream (events?follow=true) answers itself
            await result(scope, receive, send)
            return
        if endpoint.name == "admit" and not _admitted(result):
            info.outcome = "denied"
        payload = _encode(result)
        await send({"type": "http.response.start", "status": endpoint.ok,
                    "headers": [_JSON, (b"content-length", b"%d" % len(payload))]})
        await send({"type": "http.response.body", "body": payload})


ALL_HANDLERS: dict[str, Handler] = {**HANDLERS, **rollouts.HANDLERS}


def _rollout_id(raw: str | None) -> int:
    if raw is None:
        return 0
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise errors.invalid("rollout_id must be a whole number")
    return int(raw)


def _picked_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, bytes | None]:
    """The platform key (exactly one, or none) and Content-Length, in one pass."""
    key: bytes | None = None
    length: bytes | None = None
    for name, value in headers:
        if name == b"x-platform-key":
            if key is not None:
                raise errors.invalid("X-Platform-Key given more than once")
            key = value
        elif name == b"content-length":
            length = value
    return (None if key is None else key.decode("latin-1")), length


async def _read_body(receive: Receive, length: bytes | None) -> bytes:
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise errors.invalid(f"body over {MAX_BODY // 1024} KiB")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            raise errors.invalid("the request ended before its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise errors.invalid(f"body over {MAX_BODY // 1024} KiB")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _admitted(result: Any) -> bool:
    value = result.get("admitted") if isinstance(result, dict) else getattr(result, "admitted", True)
    return bool(value)
