"""The client's exceptions: one class per error code of the API, with the server's names.

The table of codes (app.errors.CODES: code, status, retryable, meaning) is the server's; each
class here stands for one code and is named after it, as on the server (PORT_EXHAUSTION:
PortExhaustion); a class whose name or code is not the table's fails at import. Every error
response has the body `{"error": {"code": ..., "message": ..., "request_id": ...}}`;
`error_from_response` turns it into the matching exception. Network failures are not wrapped:
they stay `httpx.HTTPError`s, so a caller can tell "the orchestrator said no" from "the
orchestrator could not be reached".
"""

from __future__ import annotations

import math
import time
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx

from app.errors import BY_CODE


class OrchestratorError(Exception):
    """An error answer from the orchestrator (or an answer the client cannot read).

    `code` is the API's error code; an answer without the API's error shape (a proxy's HTML
    502, say) gets `HTTP_<status>`. `retry_after` is the Retry-After header in seconds, when
    the server sent one (it does with RATE_LIMITED). `retryable`: the table says a retry is
    safe (nothing was changed, or the cause is passing).
    """

    CODE: ClassVar[str | None] = None  # the API code this class stands for; None: any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        entry = BY_CODE.get(cls.CODE or "")
        if cls.CODE is not None and cls.CODE != "UNEXPECTED_RESPONSE" and (
                entry is None or entry.class_name != cls.__name__):
            raise TypeError(f"{cls.__name__}.CODE {cls.CODE!r} is not the table's (app.errors.CODES)")
        if entry is not None and cls.__doc__ is None:
            cls.__doc__ = entry.meaning[:1].upper() + entry.meaning[1:] + "."

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None,
                 retry_after: float | None = None, response: httpx.Response | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after
        self.response = response

    @property
    def retryable(self) -> bool:
        entry = BY_CODE.get(self.code)
        return entry.retryable if entry is not None else self.status in (502, 503, 504)

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
    """No such route (usually a client and server of different versions), or no such rollout."""

    CODE = "NOT_FOUND"


class MethodNotAllowed(OrchestratorError):
    CODE = "METHOD_NOT_ALLOWED"


class RequestTimeout(OrchestratorError):
    CODE = "REQUEST_TIMEOUT"


class EngineAlreadyExists(OrchestratorError):
    CODE = "ENGINE_ALREADY_EXISTS"


class EngineAlreadyRunning(OrchestratorError):
    CODE = "ENGINE_ALREADY_RUNNING"


class EngineNotRunning(OrchestratorError):
    CODE = "ENGINE_NOT_RUNNING"


class IllegalTransition(OrchestratorError):
    CODE = "ILLEGAL_TRANSITION"


class RolloutFinished(OrchestratorError):
    CODE = "ROLLOUT_FINISHED"


class EngineBusy(OrchestratorError):
    CODE = "ENGINE_BUSY"


class QuotaExceeded(OrchestratorError):
    CODE = "QUOTA_EXCEEDED"


class RateLimited(OrchestratorError):
    """Over the product's admits per minute; wait `retry_after` seconds."""

    CODE = "RATE_LIMITED"


class HeadersTooLarge(OrchestratorError):
    CODE = "HEADERS_TOO_LARGE"


class Internal(OrchestratorError):
    CODE = "INTERNAL"


class KeyNotConfirmed(OrchestratorError):
    CODE = "KEY_NOT_CONFIRMED"


class DriverFailed(OrchestratorError):
    CODE = "DRIVER_FAILED"


class UpgradeFailed(OrchestratorError):
    CODE = "UPGRADE_FAILED"


class SnapshotNotFound(OrchestratorError):
    CODE = "SNAPSHOT_NOT_FOUND"


class SnapshotStoreFailed(OrchestratorError):
    CODE = "SNAPSHOT_STORE_FAILED"


class PortExhaustion(OrchestratorError):
    CODE = "PORT_EXHAUSTION"


class CapacityExhausted(OrchestratorError):
    CODE = "CAPACITY_EXHAUSTED"


class SchedulerUnavailable(OrchestratorError):
    CODE = "SCHEDULER_UNAVAILABLE"


class ServerBusy(OrchestratorError):
    CODE = "SERVER_BUSY"


class BootTimeout(OrchestratorError):
    """Not healthy within ORCH_BOOT_TIMEOUT_S; the engine stays registered as `failed`."""

    CODE = "BOOT_TIMEOUT"


class HttpVersionNotSupported(OrchestratorError):
    CODE = "HTTP_VERSION_NOT_SUPPORTED"


class UnexpectedResponse(OrchestratorError):
    """A success status whose body the client cannot read (not the API's shape)."""

    CODE = "UNEXPECTED_RESPONSE"  # made up by the client; the server never sends it


ERRORS_BY_CODE: dict[str, type[OrchestratorError]] = {
    cls.CODE: cls for cls in OrchestratorError.__subclasses__()
    if cls.CODE is not None and cls.CODE in BY_CODE
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
