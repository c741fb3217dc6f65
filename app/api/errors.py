"""How every error is answered: one exception handler, keyed by the error's `code`.

Domain errors (app/errors.py, the drivers' errors included) carry a `code` and no HTTP status;
the table of codes (app.errors.CODES) is the one place that maps a code to a status.
Starlette's own 404/405, a database that cannot be reached, and bugs are mapped here too.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import peewee as pw
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from app.errors import STATUS_BY_CODE, DomainError

log = logging.getLogger("orch.api")


def error_response(status: int, code: str, message: str, request_id: str,
                   headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})
    return Response(body, status, headers, media_type="application/json")


def classify(exc: BaseException, request_id: str) -> tuple[int, str, str, dict[str, str]]:
    """(status, code, message, extra headers) for any exception."""
    if isinstance(exc, DomainError):
        return STATUS_BY_CODE[exc.code], exc.code, exc.message or str(exc), _headers(exc)
    if isinstance(exc, HTTPException):
        if exc.status_code == 405:
            return 405, "METHOD_NOT_ALLOWED", "method not allowed here", dict(exc.headers or {})
        return exc.status_code, "NOT_FOUND", "no such route", {}
    if isinstance(exc, (pw.OperationalError, pw.InterfaceError)):
        log.warning("database unavailable (request %s): %s", request_id, exc)
        return 503, "SCHEDULER_UNAVAILABLE", "the database cannot be reached; try again", {}
    log.error("internal error (request %s)", request_id, exc_info=exc)
    return 500, "INTERNAL", f"internal error; quote request id {request_id}", {}


def _headers(exc: BaseException) -> dict[str, str]:
    headers: dict[str, str] = dict(getattr(exc, "headers", None) or {})
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, (int, float)) and "Retry-After" not in headers:
        headers["Retry-After"] = str(max(1, int(retry_after)))
    return headers


HANDLED: tuple[type[Exception], ...] = (
    HTTPException, DomainError, pw.OperationalError, pw.InterfaceError)


async def handle(request: Request, exc: Exception) -> Response:
    """The application's exception handler, for every exception (see app.build)."""
    info: Any = request.scope.get("orch")
    request_id = info.request_id if info is not None else "-"
    status, code, message, headers = classify(exc, request_id)
    if info is not None:
        info.code = code
    return error_response(status, code, message, request_id, headers)
