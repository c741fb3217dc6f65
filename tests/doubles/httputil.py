"""Shared HTTP plumbing of the double's APIs: request counting by route pattern, strict body
decoding (bad bodies are refused AND recorded for tests), blocking-query parameters, and
responses in Nomad's and Consul's styles (JSON bodies, text/plain errors, index headers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.doubles import schema
from tests.doubles.state import State

Handler = Callable[[Request], Awaitable[Response]]
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_WAIT_S = 600.0     # both Nomad and Consul cap a blocking query at 10 minutes
DEFAULT_WAIT_S = 300.0


class BadRequest(Exception):
    """Answered as 400 text/plain."""


class NotFound(Exception):
    """Answered as 404 text/plain ("job not found", ...)."""


class ServerError(Exception):
    """Answered as 500 text/plain: an error that is neither an HTTP-coded nor an RPC-coded
    error in Nomad (command/agent/http.go `wrap` answers those with 500)."""


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration, in seconds ("5s", "100ms", "1m30s"); ValueError if bad."""
    if text in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for match in DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f'time: invalid duration "{text}"')
    return total


def routes(state: State, api: str, table: list[tuple[str, list[str], Handler]]) -> list[Route]:
    """Starlette routes whose calls are counted by (api, method, pattern) in state.requests."""
    def counted(pattern: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            state.requests[(api, request.method, pattern)] += 1
            return await handler(request)
        return endpoint
    return [Route(pattern, counted(pattern, handler), methods=methods)
            for pattern, methods, handler in table]


async def read_body(request: Request, state: State, which: str, struct: str) -> Any:
    """The JSON body validated as `struct`; raises BadRequest (recorded as a rejection)."""
    raw = await request.body()
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    try:
        value = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        state.reject(request.method, path, [f"invalid JSON: {exc}"])
        raise BadRequest(f"failed to decode request body: {exc}") from None
    if value is None:
        state.reject(request.method, path, ["empty body"])
        raise BadRequest("failed to decode request body: EOF")
    errors = schema.validate(schema.load(which), struct, value)
    if errors:
        state.reject(request.method, path, errors)
        raise BadRequest("failed to decode request body: " + "; ".join(errors))
    return value


def refuse(request: Request, state: State, message: str) -> BadRequest:
    """A semantic refusal (valid JSON, invalid request): recorded like a schema one."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    state.reject(request.method, path, [message])
    return BadRequest(message)


def blocking_params(request: Request) -> tuple[int | None, float]:
    """(index, wait seconds) of a blocking query; index None when not blocking."""
    raw_index = request.query_params.get("index")
    if raw_index is None:
        return None, 0.0
    if not raw_index.isdigit():
        raise BadRequest(f"Failed to parse index: {raw_index!r}")
    raw_wait = request.query_params.get("wait")
    try:
        wait = parse_duration(raw_wait) if raw_wait else DEFAULT_WAIT_S
    except ValueError as exc:
        raise BadRequest(f"Invalid wait time: {exc}") from None
    return int(raw_index), min(wait or DEFAULT_WAIT_S, MAX_WAIT_S)


def truthy(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    return value is not None and value.lower() in ("", "1", "true", "yes")


def json_response(body: Any, headers: dict[str, str], status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


def text_response(text: str, status: int, headers: dict[str, str]) -> Response:
    return Response(text, status_code=status, headers=headers, media_type="text/plain")
