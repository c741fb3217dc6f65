"""Errors the API answers with: status, code and a human sentence (spec: "Errors")."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message)


def unauthorized() -> ApiError:
    return ApiError(401, "UNAUTHORIZED", "missing or unknown X-Platform-Key")


def engine_not_found(user_id: str) -> ApiError:
    return ApiError(404, "ENGINE_NOT_FOUND", f"no engine for user {user_id!r}")


def already_exists(user_id: str) -> ApiError:
    return ApiError(409, "ENGINE_ALREADY_EXISTS",
                    f"user {user_id!r} already has an engine; use /admit for idempotent behaviour")


def already_running(user_id: str) -> ApiError:
    return ApiError(409, "ENGINE_ALREADY_RUNNING", f"the engine of user {user_id!r} is already running")


def not_running(user_id: str, status: str) -> ApiError:
    return ApiError(409, "ENGINE_NOT_RUNNING", f"the engine of user {user_id!r} is {status}, not running")


def quota_exceeded(limit: int) -> ApiError:
    return ApiError(429, "QUOTA_EXCEEDED", f"the product already has its maximum of {limit} engines")


def rate_limited(retry_after: int) -> ApiError:
    return ApiError(429, "RATE_LIMITED", f"too many admits; retry in {retry_after}s",
                    {"Retry-After": str(retry_after)})


def busy(user_id: str) -> ApiError:
    return ApiError(503, "SCHEDULER_UNAVAILABLE",
                    f"the engine of user {user_id!r} is held by another operation; try again")


def boot_timeout(message: str) -> ApiError:
    return ApiError(504, "BOOT_TIMEOUT", message)
