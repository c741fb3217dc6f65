"""A request as the handlers see it: headers, query and a size-capped, strictly-checked body."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from app import errors

MAX_BODY = 64 * 1024


# Parsed and checked small bodies, by (body, field spec): clients send the same few bodies
# (`{}`, `{"auto_wake":true}`) on every admit, and json.loads plus the checks cost more than
# this lookup. Only successes are kept, and each caller gets its own copy.
_PARSED: dict[tuple[bytes, tuple[tuple[str, type], ...], tuple[str, ...]], dict[str, Any]] = {}
_PARSED_BODY_MAX = 256
_PARSED_MAX = 1024

# The headers the API itself reads on every request, picked out in one pass over the raw list
# (decoding every header into a dict cost more than the rest of the parsing).
_HOT_HEADERS = {b"x-request-id": 0, b"x-platform-key": 1, b"content-length": 2}


class Request:
    __slots__ = (
        "_body",
        "_headers",
        "_receive",
        "content_length",
        "platform_key",
        "request_id",
        "scope",
    )

    def __init__(self, scope: dict[str, Any], receive: Any):
        self.scope = scope
        self._receive = receive
        self._body: bytes | None = None
        self._headers: dict[str, str] | None = None
        found: list[bytes | None] = [None, None, None]
        hot = _HOT_HEADERS
        for name, value in scope["headers"]:
            slot = hot.get(name)
            if slot is None and name.lower() != name:  # servers send them lowercased; others may not
                slot = hot.get(name.lower())
            if slot is not None:
                found[slot] = value  # the last one wins, as in the dict
        request_id, platform_key, content_length = found
        self.request_id = None if request_id is None else request_id.decode("latin-1")
        self.platform_key = None if platform_key is None else platform_key.decode("latin-1")
        self.content_length = None if content_length is None else content_length.decode("latin-1")

    @property
    def headers(self) -> dict[str, str]:
        """All headers, lowercased names (built on first use: the hot path does not)."""
        if self._headers is None:
            self._headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                             for k, v in self.scope["headers"]}
        return self._headers

    async def body(self) -> bytes:
        if self._body is None:
            declared = self.content_length or ""
            if declared.isdigit() and int(declared) > MAX_BODY:
                raise errors.invalid(f"body over {MAX_BODY // 1024} KiB")
            chunks, size = [], 0
            while True:
                message = await self._receive()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > MAX_BODY:
                    raise errors.invalid(f"body over {MAX_BODY // 1024} KiB")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            self._body = b"".join(chunks)
        return self._body

    async def json_fields(self, fields: dict[str, type], required: tuple[str, ...] = ()) -> dict[str, Any]:
        """The JSON object body, with only `fields`, each of its exact type."""
        raw = await self.body()
        key = None
        if len(raw) <= _PARSED_BODY_MAX:
            key = (raw, tuple(fields.items()), required)
            hit = _PARSED.get(key)
            if hit is not None:
                return dict(hit)
        data = self._checked(raw, fields, required)
        if key is not None:
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            _PARSED[key] = dict(data)
        return data

    @staticmethod
    def _checked(raw: bytes, fields: dict[str, type], required: tuple[str, ...]) -> dict[str, Any]:
        if not raw.strip():
            data: Any = {}
        else:
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise errors.invalid("body is not valid JSON") from None
        if not isinstance(data, dict):
            raise errors.invalid("body must be a JSON object")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise errors.invalid(f"unknown field {unknown[0]!r}")
        for name in required:
            if name not in data:
                raise errors.invalid(f"{name} is required")
        for name, value in data.items():
            kind = fields[name]
            # bool is an int in Python; JSON true is not a number, and 1 is not a bool.
            if type(value) is not kind:
                raise errors.invalid(f"{name} must be a {_json_type(kind)}")
        return data

    async def no_body_fields(self) -> None:
        await self.json_fields({})

    def query(self, allowed: set[str]) -> dict[str, str]:
        raw = self.scope.get("query_string", b"").decode("latin-1")
        try:
            pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=bool(raw),
                              errors="strict")
        except (ValueError, UnicodeDecodeError):
            raise errors.invalid("malformed query string") from None
        result: dict[str, str] = {}
        for name, value in pairs:
            if name not in allowed:
                raise errors.invalid(f"unknown query parameter {name!r}")
            if name in result:
                raise errors.invalid(f"query parameter {name!r} given twice")
            result[name] = value
        return result


def _json_type(kind: type) -> str:
    return {bool: "boolean", str: "string", int: "integer"}.get(kind, kind.__name__)
