"""A request as the handlers see it: headers, query and a size-capped, strictly-checked body."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from app import errors

MAX_BODY = 64 * 1024


class Request:
    __slots__ = ("scope", "_receive", "_body", "headers")

    def __init__(self, scope: dict[str, Any], receive: Any):
        self.scope = scope
        self._receive = receive
        self._body: bytes | None = None
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

    async def body(self) -> bytes:
        if self._body is None:
            declared = self.headers.get("content-length", "")
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
