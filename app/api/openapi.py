"""The OpenAPI 3.1 document, derived from the endpoint table (app/api/spec.py): paths,
parameters, bodies, answers and every status each operation can answer.

Its patterns are Python regular expressions (as msgspec and schemathesis read them), and they
refuse exactly what the server refuses: where the server calls str.isprintable(), the pattern
names every code point it refuses (`printable_patterns`)."""

from __future__ import annotations

import functools
import re
from typing import Any

import msgspec

from app.api.spec import (
    ENDPOINTS,
    STATUS_BY_CODE,
    USER_ID_PATTERN,
    USER_ID_RULE,
    VERSION_PATTERN,
    Archive,
    Document,
    Endpoint,
    ErrorAnswer,
    Text,
)

REF = "#/components/schemas/{name}"


def document() -> dict[str, Any]:
    types = list(dict.fromkeys([ErrorAnswer, *(t for e in ENDPOINTS for t in _types(e))]))
    refs, schemas = msgspec.json.schema_components(types, ref_template=REF)
    by_type: dict[Any, Any] = dict(zip(types, refs))
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, by_type)
    _exact_patterns(schemas)
    _exact_patterns(paths)
    schemas.update(_exact_schemas())
    return {
        "openapi": "3.1.0",
        "info": {"title": "Engine orchestrator", "version": "1.0.0",
                 "description": "Every error answers the Error shape with one of the codes "
                                "listed under each status; every answer has X-Request-ID."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"platformKey": {"type": "apiKey", "in": "header",
                                                "name": "X-Platform-Key"}},
        },
    }


_BINARY = {"schema": {"type": "string", "format": "binary"}}


@functools.cache
def printable_patterns() -> dict[str, tuple[str, str, int]]:
    """The table's cheap patterns -> (the exact one; the schema named for it; its longest
    length). Exact: the code points str.isprintable() accepts, named range by range (as a
    class of what is allowed, not of what is refused: generators draw from it far faster)."""
    flags = bytes(map(str.isprintable, map(chr, range(0x110000))))

    def printable(but: str = "") -> str:
        allowed = bytearray(flags)
        for char in but:
            allowed[ord(char)] = 0
        return "".join(_range(m.start(), m.end() - 1) for m in re.finditer(b"\x01+", allowed))

    # A version: spaces, then a printable non-space, then anything printable.
    return {USER_ID_PATTERN: (f"^[{printable('/')}]{{1,128}}$", "UserId", 128),
            VERSION_PATTERN: (f"^ *[{printable(' ')}][{printable()}]*$", "EngineVersion", 256)}


def _range(first: int, last: int) -> str:
    def escape(point: int) -> str:
        return f"\\u{point:04x}" if point < 0x10000 else f"\\U{point:08x}"
    return escape(first) if first == last else f"{escape(first)}-{escape(last)}"


def _exact_patterns(node: Any) -> None:
    """Each string schema with a cheap pattern refers to its exact schema instead (one copy
    of each long pattern in the document)."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern in printable_patterns():
            for keyword in ("type", "pattern", "minLength", "maxLength"):
                node.pop(keyword, None)
            node["$ref"] = REF.format(name=printable_patterns()[pattern][1])
        for value in node.values():
            _exact_patterns(value)
    elif isinstance(node, list):
        for value in node:
            _exact_patterns(value)


def _exact_schemas() -> dict[str, Any]:
    return {name: {"type": "string", "minLength": 1, "maxLength": longest, "pattern": exact}
            for exact, name, longest in printable_patterns().values()}


def _types(endpoint: Endpoint) -> list[type[Any]]:
    found = [t for t in (endpoint.body, endpoint.answer) if t is not None]
    return [t for t in found if t not in (Text, Document, Archive)]


def _operation(endpoint: Endpoint, refs: dict[type[Any], Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": endpoint.name, "summary": endpoint.summary,
                          "parameters": _parameters(endpoint),
                          "responses": _responses(endpoint, refs)}
    if endpoint.auth:
        op["security"] = [{"platformKey": []}]
    if endpoint.upload:
        op["requestBody"] = {"required": True, "content": {"application/x-tar": _BINARY}}
    if endpoint.body is not None:
        op["requestBody"] = {"required": endpoint.body_required,
                             "content": {"application/json": {"schema": refs[endpoint.body]}}}
    return op


def _parameters(endpoint: Endpoint) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    if "{user_id}" in endpoint.path:
        params.append({"name": "user_id", "in": "path", "required": True,
                       "description": USER_ID_RULE,
                       "schema": {"type": "string", "minLength": 1, "maxLength": 128,
                                  "pattern": USER_ID_PATTERN}})
    if "{rollout_id}" in endpoint.path:
        params.append({"name": "rollout_id", "in": "path", "required": True,
                       "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}})
    if endpoint.query is not None:
        schema = msgspec.json.schema(endpoint.query)
        for field in msgspec.structs.fields(endpoint.query):
            prop = _inline(schema, field.encode_name)
            params.append({"name": field.encode_name, "in": "query", "required": field.required,
                           "schema": prop})
    return params


def _inline(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """A query field's schema with the Struct's $defs resolved (a parameter stands alone)."""
    defs = schema.get("$defs", {})
    struct = defs[schema["$ref"].rsplit("/", 1)[1]]
    prop = dict(struct["properties"][name])
    ref = prop.pop("$ref", None)
    if ref is not None:
        prop.update(defs[ref.rsplit("/", 1)[1]])
    return prop


def _responses(endpoint: Endpoint, refs: dict[type[Any], Any]) -> dict[str, Any]:
    ok = _answer(endpoint, refs)
    if endpoint.name == "provision":
        ok = {**ok, "links": _user_links()}
    responses: dict[str, Any] = {str(s): ok for s in (endpoint.ok, *endpoint.also_ok)}
    by_status: dict[int, list[str]] = {}
    for code in endpoint.codes:
        by_status.setdefault(STATUS_BY_CODE[code], []).append(code)
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = {
            "description": "error: " + ", ".join(codes),
            "content": {"application/json": {"schema": _error_schema(codes)}}}
    return responses


def _user_links() -> dict[str, Any]:
    """A provisioned engine's user id leads to every call on that engine (stateful testing,
    and a hint to readers)."""
    return {f"{e.name}_the_engine": {"operationId": e.name,
                                     "parameters": {"path.user_id": "$response.body#/user_id"}}
            for e in ENDPOINTS if "{user_id}" in e.path}


def _answer(endpoint: Endpoint, refs: dict[type[Any], Any]) -> dict[str, Any]:
    if endpoint.answer is Text:
        return {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    if endpoint.answer is Archive:
        return {"description": "OK", "content": {"application/x-tar": _BINARY}}
    if endpoint.answer is Document:
        return {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    content: dict[str, Any] = {"application/json": {"schema": refs[endpoint.answer]}}
    if endpoint.streams:  # one Server-Sent Event per audit event: its JSON in `data`, its id
        content["text/event-stream"] = {"schema": _sse_schema()}
    return {"description": "OK", "content": content}


def _sse_schema() -> dict[str, Any]:
    """One Server-Sent Event of a follow=true stream: an audit Event's JSON in `data`."""
    event = {"$ref": REF.format(name="Event")}
    return {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": event},
        "id": {"type": "string"}, "event": {"type": "string"}}}


def _error_schema(codes: list[str]) -> dict[str, Any]:
    return {"allOf": [{"$ref": REF.format(name="ErrorAnswer")},
                      {"type": "object", "properties": {"error": {
                          "type": "object", "properties": {"code": {"enum": codes}}}}}]}
