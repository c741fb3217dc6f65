"""Request checks derived from the endpoint table: the body (size-capped, decoded by msgspec
into the endpoint's Struct: unknown fields, wrong types, nulls and repeated keys refused), the
query string (strict: unknown or repeated parameters refused) and the platform key header
(exactly one)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import msgspec
import msgspec.inspect

from app import errors
from app.api.spec import Endpoint

MAX_BODY = 64 * 1024
_EMPTY = (b"", b"{}")


class Checks:
    """The decoders of one endpoint, built once."""

    __slots__ = ("body_decoder", "bool_params", "empty_body", "endpoint", "int_params",
                 "query_fields")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.body_decoder = msgspec.json.Decoder(endpoint.body) if endpoint.body else None
        # An omitted body is "every field omitted"; for a body with a required field the
        # decoder says which one is missing.
        self.empty_body: Any = None
        if endpoint.body is not None and not endpoint.body_required:
            self.empty_body = endpoint.body()
        fields = msgspec.structs.fields(endpoint.query) if endpoint.query else ()
        self.query_fields = {f.encode_name for f in fields}
        self.int_params = {f.encode_name for f in fields if _is(f.type, msgspec.inspect.IntType)}
        self.bool_params = {f.encode_name for f in fields if _is(f.type, msgspec.inspect.BoolType)}

    def body(self, raw: bytes) -> Any:
        if self.body_decoder is None:
            if raw.strip() not in _EMPTY:
                raise errors.invalid("this call takes no body")
            return None
        if not raw.strip():
            if self.empty_body is None:
                return self._decode(b"{}")  # names the missing field
            return self.empty_body
        return self._decode(raw)

    def _decode(self, raw: bytes) -> Any:
        assert self.body_decoder is not None
        try:
            body = self.body_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            body = self._whole_floats(raw, exc)
        except msgspec.DecodeError:
            raise errors.invalid("body is not valid JSON") from None
        # msgspec keeps the last of repeated keys; a client meaning the first would be
        # silently overruled, so a repeated key is refused.
        json.loads(raw, object_pairs_hook=_once_each)
        return body

    def _whole_floats(self, raw: bytes, exc: msgspec.ValidationError) -> Any:
        """JSON has one number type: 5.0 is the integer 5 (as JSON Schema says too). msgspec
        refuses a float for an int; the body's whole floats are made ints and it is tried
        again (our bodies are flat objects)."""
        assert self.endpoint.body is not None
        found = msgspec.json.decode(raw)
        if not isinstance(found, dict) or not any(isinstance(v, float) for v in found.values()):
            raise errors.invalid(f"body: {exc}") from None
        whole = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                 for k, v in found.items()}
        try:
            return msgspec.convert(whole, self.endpoint.body)
        except msgspec.ValidationError as again:
            raise errors.invalid(f"body: {again}") from None

    def query(self, raw: bytes) -> Any:
        pairs = _pairs(raw)
        if self.endpoint.query is None:
            if pairs:
                raise errors.invalid(f"unknown query parameter {pairs[0][0]!r}")
            return None
        found: dict[str, Any] = {}
        for name, value in pairs:
            if name not in self.query_fields:
                raise errors.invalid(f"unknown query parameter {name!r}")
            if name in found:
                raise errors.invalid(f"query parameter {name!r} given twice")
            if name in self.int_params:
                found[name] = _int(name, value)
            elif name in self.bool_params:
                found[name] = _bool(name, value)
            else:
                found[name] = value
        try:
            return msgspec.convert(found, self.endpoint.query)
        except msgspec.ValidationError as exc:
            raise errors.invalid(f"query: {exc}") from None


def _once_each(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise errors.invalid(f"body: key {key!r} given twice")
        seen.add(key)


def _pairs(raw: bytes) -> list[tuple[str, str]]:
    if not raw:
        return []
    try:
        return parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=True,
                         errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise errors.invalid("malformed query string") from None


def _int(name: str, value: str) -> int:
    # ASCII digits only: str.isdigit() is true for '²' and '٣', which int() refuses or reads
    # differently; 19 digits keep it inside a 64-bit integer.
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise errors.invalid(f"{name} must be a whole number")
    return int(value)


def _bool(name: str, value: str) -> bool:
    if value not in ("true", "false"):
        raise errors.invalid(f"{name} must be true or false")
    return value == "true"


def _is(annotation: Any, kind: type[msgspec.inspect.Type]) -> bool:
    """Whether `annotation` is `kind`, or a union with it, annotated or not."""
    info = msgspec.inspect.type_info(annotation)
    kinds = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return any(isinstance(k.type if isinstance(k, msgspec.inspect.Metadata) else k, kind)
               for k in kinds)
