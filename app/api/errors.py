"""How errors are answered: one JSON shape for every error, never a traceback. The one place
where a domain error's code becomes an HTTP status."""

from __future__ import annotations

import json
import logging

import peewee as pw

from app.errors import DomainError

log = logging.getLogger("orch.api")

STATUS = {
    "INVALID_REQUEST": 400, "UNAUTHORIZED": 401, "ENGINE_NOT_FOUND": 404, "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405, "ENGINE_ALREADY_EXISTS": 409, "ENGINE_ALREADY_RUNNING": 409,
    "ENGINE_NOT_RUNNING": 409, "QUOTA_EXCEEDED": 429, "RATE_LIMITED": 429,
    "PORT_EXHAUSTION": 503, "CAPACITY_EXHAUSTED": 503, "SCHEDULER_UNAVAILABLE": 503,
    "BOOT_TIMEOUT": 504, "INTERNAL": 500,
}


class ApiError(Exception):
    """An answer: HTTP status, code, message and extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def error_body(status: int, code: str, message: str, request_id: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "request_id": request_id}},
                      separators=(",", ":")).encode()


def to_api_error(exc: BaseException, request_id: str) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DomainError) and exc.code in STATUS and exc.code != "INTERNAL":
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return ApiError(STATUS[exc.code], exc.code, exc.message, headers)
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
