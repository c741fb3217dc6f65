"""The OpenAPI 3 document of the whole API, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from app import states

ISO = {"type": ["string", "null"], "format": "date-time"}

ENGINE = {
    "type": "object",
    "required": ["user_id", "status", "url", "engine_version", "created_at", "updated_at",
                 "last_admit_at", "restarts", "failure_reason"],
    "properties": {
        "user_id": {"type": "string"},
        "status": {"type": "string", "enum": list(states.STATES)},
        "url": {"type": ["string", "null"]},
        "engine_version": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "last_admit_at": ISO,
        "restarts": {"type": "integer", "minimum": 0},
        "failure_reason": {"type": ["string", "null"]},
    },
}

ENGINE_WITH_KEY = {"allOf": [{"$ref": "#/components/schemas/Engine"},
                             {"type": "object", "required": ["api_key"],
                              "properties": {"api_key": {"type": "string"}}}]}

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "request_id"],
                             "properties": {"code": {"type": "string"},
                                            "message": {"type": "string"},
                                            "request_id": {"type": "string"}}}},
}

ADMIT = {
    "type": "object",
    "required": ["admitted"],
    "properties": {
        "admitted": {"type": "boolean"},
        "user_id": {"type": "string"}, "url": {"type": ["string", "null"]},
        "api_key": {"type": "string"}, "engine_version": {"type": "string"},
        "status": {"type": ["string", "null"]},
        "provisioned": {"type": "boolean"}, "woken": {"type": "boolean"},
        "reason": {"type": "string", "enum": ["engine_not_found", "engine_sleeping",
                                              "engine_stopped", "engine_unhealthy"]},
    },
}

EVENT = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "at": {"type": "string", "format": "date-time"},
                   "event": {"type": "string"}, "from": {"type": ["string", "null"]},
                   "to": {"type": ["string", "null"]}, "reason": {"type": ["string", "null"]},
                   "request_id": {"type": ["string", "null"]}},
}

USER_PARAM = {"name": "user_id", "in": "path", "required": True,
              "description": "1-128 printable characters, no '/', URL-encoded",
              "schema": {"type": "string", "minLength": 1, "maxLength": 128}}

LIMIT_PARAM = {"name": "limit", "in": "query", "required": False,
               "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}


def _ok(schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": "OK", "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    ref = {"$ref": "#/components/responses/Error"}
    return {str(code): ref for code in (400, 401, *codes)}


def _body(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    return {"required": bool(required), "content": {"application/json": {"schema": schema}}}


def _op(summary: str, ok: dict[str, Any], *codes: int, params: list[Any] | None = None,
        body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "parameters": params or [],
                          "responses": {"200": _ok(ok), **_errors(*codes)},
                          "security": [{"platformKey": []}]}
    if body:
        op["requestBody"] = body
    return op


def document() -> dict[str, Any]:
    engine = {"$ref": "#/components/schemas/Engine"}
    with_key = {"$ref": "#/components/schemas/EngineWithKey"}
    user = [USER_PARAM]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Engine orchestrator", "version": "1.0.0"},
        "paths": {
            "/engines/provision": {"post": _op(
                "Create a user's engine", with_key, 409, 429, 503, 504,
                body=_body({"user_id": {"type": "string", "minLength": 1, "maxLength": 128},
                            "engine_version": {"type": "string", "minLength": 1, "maxLength": 256}},
                           ["user_id"]))},
            "/engines": {"get": _op(
                "List the product's engines",
                {"type": "object", "properties": {"engines": {"type": "array", "items": engine},
                                                  "next_cursor": {"type": ["string", "null"]}}},
                params=[{"name": "status", "in": "query", "required": False,
                         "schema": {"type": "string", "enum": list(states.STATES)}},
                        LIMIT_PARAM,
                        {"name": "cursor", "in": "query", "required": False,
                         "schema": {"type": "string"}}])},
            "/engines/{user_id}": {
                "get": _op("Look up a user's engine", engine, 404, params=user),
                "delete": _op("Destroy a user's engine",
                              {"type": "object", "properties": {"user_id": {"type": "string"},
                                                                "destroyed": {"const": True}}},
                              404, params=user)},
            "/engines/{user_id}/start": {"post": _op("Start a stopped, sleeping or failed engine",
                                                     engine, 404, 409, 503, 504, params=user)},
            "/engines/{user_id}/stop": {"post": _op("Stop an engine; its brain is kept",
                                                    engine, 404, 409, params=user)},
            "/engines/{user_id}/rotate-key": {"post": _op("Give a running engine a new key",
                                                          with_key, 404, 409, 503, params=user)},
            "/engines/{user_id}/admit": {"post": _op(
                "Admit a user request: the engine's URL and key, or why not", ADMIT, 429, 503, 504,
                params=user, body=_body({"auto_provision": {"type": "boolean"},
                                         "auto_wake": {"type": "boolean"}}))},
            "/engines/{user_id}/events": {"get": _op(
                "The engine's audit events, newest first",
                {"type": "object", "properties": {"events": {"type": "array", "items": EVENT}}},
                params=[USER_PARAM, LIMIT_PARAM])},
        },
        "components": {
            "schemas": {"Engine": ENGINE, "EngineWithKey": ENGINE_WITH_KEY, "Error": ERROR},
            "responses": {"Error": {"description": "An error",
                                    "content": {"application/json": {
                                        "schema": {"$ref": "#/components/schemas/Error"}}}}},
            "securitySchemes": {"platformKey": {"type": "apiKey", "in": "header",
                                                "name": "X-Platform-Key"}},
        },
    }
