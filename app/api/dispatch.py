"""The ASGI endpoint of one path of the endpoint table (app.api.spec): picks the endpoint by
method, authenticates, checks the request against the endpoint's types, calls its handler
(app.api.handlers) and answers JSON."""

from __future__ import annotations

import tempfile
from typing import IO, Any

import msgspec
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from app import errors
from app.api import rollouts
from app.api.auth import Authenticator
from app.api.handlers import HANDLERS, Call, Handler, Services, check_user_id
from app.api.spec import Endpoint
from app.api.validate import MAX_BODY, Checks
from app.naming import USER_ID_MAX

UPLOAD_MAX = 2**30  # a brain archive: 1 GiB
_encode = msgspec.json.Encoder().encode
_JSON = (b"content-type", b"application/json")


class Dispatcher:
    def __init__(self, endpoints: list[Endpoint], auth: Authenticator, services: Any) -> None:
        """`services` is called for the Services once the lifespan has made them."""
        self.auth = auth
        self.services = services
        self._services: Services | None = None
        self.by_method: dict[str, tuple[Endpoint, Checks, Handler]] = {
            e.method: (e, Checks(e), ALL_HANDLERS[e.name]) for e in endpoints}
        if "GET" in self.by_method:  # Starlette routes HEAD with GET
            self.by_method["HEAD"] = self.by_method["GET"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint, checks, handler = self.by_method[scope["method"]]
        info = scope["orch"]  # RequestContext's record, with the headers it picked
        info.route = endpoint.path
        if info.keys > 1:
            raise errors.invalid("X-Platform-Key given more than once")
        key = info.key
        product = self.auth.product(None if key is None else key.decode("latin-1"))
        info.product = product.name
        path_params = scope["path_params"]
        user_id = path_params.get("user_id")
        if user_id is not None:
            info.user_id = user_id if _plainly_valid(user_id) else check_user_id(user_id)
        raw_query = scope["query_string"]
        query = None if not raw_query and endpoint.query is None else checks.query(raw_query)
        if endpoint.upload:
            body = await _upload(receive, info.length)
        else:
            body = checks.body(await _read_body(receive, info.length))
        if user_id is None:  # provision names its user in the body
            info.user_id = getattr(body, "user_id", None)
        raw_rollout = path_params.get("rollout_id")
        rollout_id = 0 if raw_rollout is None else _rollout_id(raw_rollout)
        services = self._services or self._services_once()
        result = await handler(services, Call(product, user_id or "", body, query, rollout_id))
        if isinstance(result, Response):  # a stream (events?follow=true) answers itself
            await result(scope, receive, send)
            return
        if endpoint.name == "admit" and not _admitted(result):
            info.outcome = "denied"
        payload = _encode(result)
        # The request id header too, and the record marked: RequestContext's send wrapper
        # then passes the head on as it is instead of copying it to add the header.
        info.status, info.started = endpoint.ok, True
        await send({"type": "http.response.start", "status": endpoint.ok,
                    "headers": [_JSON, (b"content-length", b"%d" % len(payload)), info.id_header]})
        await send({"type": "http.response.body", "body": payload})

    def _services_once(self) -> Services:
        self._services = self.services()
        return self._services


ALL_HANDLERS: dict[str, Handler] = {**HANDLERS, **rollouts.HANDLERS}


def _plainly_valid(user_id: str) -> bool:
    """naming.user_id_problem's common case in one call instead of two: a short printable
    id without '/'. Anything else gets the full check and its message."""
    return 0 < len(user_id) <= USER_ID_MAX and user_id.isprintable() and "/" not in user_id


def _rollout_id(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise errors.invalid("rollout_id must be a whole number")
    return int(raw)


async def _read_body(receive: Receive, length: bytes | None) -> bytes:
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise errors.invalid(f"body over {MAX_BODY // 1024} KiB")
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body: bytes = message.get("body", b"")  # the whole body in one message: most requests
        if len(body) > MAX_BODY:
            raise errors.invalid(f"body over {MAX_BODY // 1024} KiB")
        return body
    return await _read_rest(receive, message)


async def _upload(receive: Receive, length: bytes | None) -> IO[bytes]:
    """A large body (a tar archive) into a temporary file, spilled to disk past 8 MiB."""
    if length is not None and length.isdigit() and int(length) > UPLOAD_MAX:
        raise errors.invalid(f"body over {UPLOAD_MAX // 2**20} MiB")
    spool = tempfile.SpooledTemporaryFile(max_size=8 * 2**20)  # noqa: SIM115 - the caller's
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            spool.close()
            raise errors.invalid("the request ended before its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > UPLOAD_MAX:
            spool.close()
            raise errors.invalid(f"body over {UPLOAD_MAX // 2**20} MiB")
        spool.write(chunk)
        if not message.get("more_body", False):
            spool.seek(0)
            return spool


async def _read_rest(receive: Receive, message: Message) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] != "http.request":  # the client went away
            raise errors.invalid("the request ended before its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise errors.invalid(f"body over {MAX_BODY // 1024} KiB")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


def _admitted(result: Any) -> bool:
    value = result.get("admitted") if isinstance(result, dict) else getattr(result, "admitted", True)
    return bool(value)
