"""How errors are answered: one JSON shape for every error, never a traceback."""

from __future__ import annotations

import json
import logging

import peewee as pw

from app.drivers.base import DriverError
from app.errors import ApiError

log = logging.getLogger("orch.api")


def error_body(status: int, code: str, message: str, request_id: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "request_id": request_id}},
                      separators=(",", ":")).encode()


def to_api_error(exc: BaseException, request_id: str) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DriverError):
        return ApiError(exc.status, exc.code, str(exc))
    if isinstance(exc, (pw.OperationalError, pw.InterfaceError)):
        log.warning("database unavailable (request %s): %s", request_id, exc)
        return ApiError(503, "SCHEDULER_UNAVAILABLE", "the database cannot be reached; try again")
    log.error("internal error (request %s)", request_id, exc_info=exc)
    return ApiError(500, "INTERNAL", f"internal error; quote request id {request_id}")


def not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "no such route")


def method_not_allowed(allowed: list[str]) -> ApiError:
    return ApiError(405, "METHOD_NOT_ALLOWED", "method not allowed here",
                    {"Allow": ", ".join(sorted(allowed))})
