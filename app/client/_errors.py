"""The client's exceptions: one class per error code of the API (spec: "Errors").

Every error response of the orchestrator has the body
`{"error": {"code": ..., "message": ..., "request_id": ...}}`; `error_from_response` turns it
into the matching exception. Network failures are not wrapped: they stay `httpx.HTTPError`s,
so a caller can tell "the orchestrator said no" from "the orchestrator could not be reached".
"""

from __future__ import annotations

import math
import time
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx


class OrchestratorError(Exception):
    """An error answer from the orchestrator (or an answer the client cannot read).

    `code` is the API's error code; an answer without the API's error shape (a proxy's HTML
    502, say) gets `HTTP_<status>`. `retry_after` is the Retry-After header in seconds, when
    the server sent one (it does with RATE_LIMITED).
    """

    CODE: ClassVar[str | None] = None  # the API code this class stands for; None: any

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None,
                 retry_after: float | None = None, response: httpx.Response | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after
        self.response = response

    def __str__(self) -> str:
        request = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.status} {self.code}: {self.message}{request}"


class InvalidRequest(OrchestratorError):
    CODE = "INVALID_REQUEST"


class Unauthorized(OrchestratorError):
    CODE = "UNAUTHORIZED"


class EngineNotFound(OrchestratorError):
    CODE = "ENGINE_NOT_FOUND"


class NotFound(OrchestratorError):
    """No such route: usually a client and server of different versions."""

    CODE = "NOT_FOUND"


class MethodNotAllowed(OrchestratorError):
    CODE = "METHOD_NOT_ALLOWED"


class EngineAlreadyExists(OrchestratorError):
    CODE = "ENGINE_ALREADY_EXISTS"


class EngineAlreadyRunning(OrchestratorError):
    CODE = "ENGINE_ALREADY_RUNNING"


class EngineNotRunning(OrchestratorError):
    CODE = "ENGINE_NOT_RUNNING"


class QuotaExceeded(OrchestratorError):
    CODE = "QUOTA_EXCEEDED"


class RateLimited(OrchestratorError):
    """Over the product's admits per minute; wait `retry_after` seconds."""

    CODE = "RATE_LIMITED"


class PortExhaustion(OrchestratorError):
    CODE = "PORT_EXHAUSTION"


class CapacityExhausted(OrchestratorError):
    CODE = "CAPACITY_EXHAUSTED"


class SchedulerUnavailable(OrchestratorError):
    """Nomad, Consul or the database is unreachable, or the engine is held by another
    operation (the server's "busy" answer); nothing was changed, so a retry is safe."""

    CODE = "SCHEDULER_UNAVAILABLE"


class BootTimeout(OrchestratorError):
    """Not healthy in time; the engine stays registered as `failed`."""

    CODE = "BOOT_TIMEOUT"


class UpgradeFailed(OrchestratorError):
    """The new engine_version was not healthy in time; the engine is back on its previous
    version, running, brain kept."""

    CODE = "UPGRADE_FAILED"


class RolloutFinished(OrchestratorError):
    """Pause, resume or abort of a rollout that already ended."""

    CODE = "ROLLOUT_FINISHED"


class EngineBusy(OrchestratorError):
    """An upgrade found the engine held by another operation past the wait; nothing was
    changed, so a retry is safe."""

    CODE = "ENGINE_BUSY"


class Internal(OrchestratorError):
    CODE = "INTERNAL"


class UnexpectedResponse(OrchestratorError):
    """A success status whose body the client cannot read (not the API's shape)."""

    CODE = "UNEXPECTED_RESPONSE"  # made up by the client; the server never sends it


ERRORS_BY_CODE: dict[str, type[OrchestratorError]] = {
    cls.CODE: cls for cls in (
        InvalidRequest, Unauthorized, EngineNotFound, NotFound, MethodNotAllowed,
        EngineAlreadyExists, EngineAlreadyRunning, EngineNotRunning, QuotaExceeded, RateLimited,
        PortExhaustion, CapacityExhausted, SchedulerUnavailable, BootTimeout, UpgradeFailed, RolloutFinished,
        EngineBusy, Internal)
    if cls.CODE is not None
}


def error_from_response(response: httpx.Response) -> OrchestratorError:
    """The exception for an error response (status >= 400). Unknown codes, from a newer
    server, give the base class so that `except OrchestratorError` still catches them."""
    error = _error_object(response)
    code = _text(error.get("code")) or f"HTTP_{response.status_code}"
    message = _text(error.get("message")) or response.reason_phrase or "error"
    request_id = _text(error.get("request_id")) or response.headers.get("x-request-id")
    cls = ERRORS_BY_CODE.get(code, OrchestratorError)
    return cls(response.status_code, code, message, request_id,
               retry_after=parse_retry_after(response.headers.get("retry-after")),
               response=response)


def raise_for_error(response: httpx.Response) -> None:
    """Raise the matching OrchestratorError when `response` is an error; else do nothing."""
    if response.is_error:
        raise error_from_response(response)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: either delta-seconds or an HTTP date (RFC 9110 allows both)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:  # not JSON: a proxy's page, an empty body
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# ---- the HTTP edge's refusals (the server's app/api/edge.py) ---------------------------------


class RequestTimeout(OrchestratorError):
    """The request body did not arrive in time; nothing was run, so a retry is safe."""

    CODE = "REQUEST_TIMEOUT"


class HeadersTooLarge(OrchestratorError):
    CODE = "HEADERS_TOO_LARGE"


class ServerBusy(OrchestratorError):
    """At the server's connection limit; retry after `retry_after` seconds."""

    CODE = "SERVER_BUSY"


class HttpVersionNotSupported(OrchestratorError):
    CODE = "HTTP_VERSION_NOT_SUPPORTED"


ERRORS_BY_CODE.update({cls.CODE: cls for cls in (RequestTimeout, HeadersTooLarge, ServerBusy,
                                                 HttpVersionNotSupported) if cls.CODE})
