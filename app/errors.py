"""The domain's one error tree. Each error has the spec's `code` and a human `message`; none
knows HTTP: the API maps code -> status in one place (app/api/errors.py).

    DomainError
    ├── InvalidRequest (BadVersion), Unauthorized        (the caller's fault)
    ├── EngineNotFound, AlreadyExists, AlreadyRunning, NotRunning
    ├── QuotaExceeded, RateLimited                       (policy)
    ├── Unavailable (SCHEDULER_UNAVAILABLE: nothing was changed; try again)
    │   ├── Busy         another operation held the engine past the wait
    │   │   └── EngineBusy   the same, for an upgrade: 409 ENGINE_BUSY
    │   ├── Conflict     a compare-and-set lost: the row changed since it was read
    │   ├── IllegalTransition  the state table forbids the move from the row's current state
    │   └── DriverError  raised by drivers; carries what was left running (`state`)
    │       ├── SchedulerUnavailable, PortExhausted, CapacityExhausted (NodeLost)
    │       └── BootTimeout, EngineCrashed               (BOOT_TIMEOUT)
    └── UpgradeFailed    the new version was not healthy in time; the engine is back on its old one
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # seconds, for RATE_LIMITED


class InvalidRequest(DomainError):
    code = "INVALID_REQUEST"


class BadVersion(InvalidRequest):
    """An engine_version the driver cannot run (SPEC "Additions"); the message says why."""


class Unauthorized(DomainError):
    code = "UNAUTHORIZED"


class EngineNotFound(DomainError):
    code = "ENGINE_NOT_FOUND"


class AlreadyExists(DomainError):
    code = "ENGINE_ALREADY_EXISTS"


class AlreadyRunning(DomainError):
    code = "ENGINE_ALREADY_RUNNING"


class NotRunning(DomainError):
    code = "ENGINE_NOT_RUNNING"


class QuotaExceeded(DomainError):
    code = "QUOTA_EXCEEDED"


class RateLimited(DomainError):
    code = "RATE_LIMITED"


class Unavailable(DomainError):
    code = "SCHEDULER_UNAVAILABLE"


class Busy(Unavailable):
    pass


class EngineBusy(Busy):
    """An upgrade found the engine held by another operation (another replica's,
    or an `orch engines upgrade`) past the wait. The spec answers that with a 409 for an
    upgrade; other operations keep Busy's 503. Nothing was changed; a retry is safe."""

    code = "ENGINE_BUSY"


class Conflict(Unavailable):
    pass


class IllegalTransition(Unavailable):
    def __init__(self, event: str, state: str | None):
        super().__init__(f"cannot {event} an engine that is {state}")
        self.event, self.state = event, state


class DriverError(Unavailable):
    def __init__(self, message: str, state: dict[str, Any] | None = None):
        super().__init__(message)
        self.state = state  # what was left running, when anything was (None: nothing)


class SchedulerUnavailable(DriverError):
    pass


class PortExhausted(DriverError):
    code = "PORT_EXHAUSTION"


class CapacityExhausted(DriverError):
    code = "CAPACITY_EXHAUSTED"


class NodeLost(CapacityExhausted):
    """The engine's node is down, and its brain with it: a 503, reason node_lost."""

    reason = "node_lost"


class BootTimeout(DriverError):
    code = "BOOT_TIMEOUT"


class EngineCrashed(DriverError):
    """The engine's process or task ended while it was booting."""

    code = "BOOT_TIMEOUT"


class UpgradeFailed(DomainError):
    """The new version did not come up; the engine was put back on its previous
    version (running again, brain kept, unless that failed too: then it is failed)."""

    code = "UPGRADE_FAILED"


class RolloutNotFound(DomainError):
    code = "NOT_FOUND"


class RolloutFinished(DomainError):
    """Pause, resume or abort of a rollout that already ended."""

    code = "ROLLOUT_FINISHED"


# ---- factories (the messages in one place) ---------------------------------------------------


def invalid(message: str) -> InvalidRequest:
    return InvalidRequest(message)


def unauthorized() -> Unauthorized:
    return Unauthorized("missing or unknown X-Platform-Key")


def engine_not_found(user_id: str) -> EngineNotFound:
    return EngineNotFound(f"no engine for user {user_id!r}")


def already_exists(user_id: str) -> AlreadyExists:
    return AlreadyExists(f"user {user_id!r} already has an engine; use /admit for idempotent behaviour")


def already_running(user_id: str) -> AlreadyRunning:
    return AlreadyRunning(f"the engine of user {user_id!r} is already running")


def not_running(user_id: str, status: str) -> NotRunning:
    return NotRunning(f"the engine of user {user_id!r} is {status}, not running")


def quota_exceeded(limit: int) -> QuotaExceeded:
    return QuotaExceeded(f"the product already has its maximum of {limit} engines")


def rate_limited(retry_after: int) -> RateLimited:
    return RateLimited(f"too many admits; retry in {retry_after}s", retry_after=retry_after)


def busy(user_id: str) -> Busy:
    return Busy(f"the engine of user {user_id!r} is held by another operation; try again")


def engine_busy(user_id: str) -> EngineBusy:
    return EngineBusy(f"the engine of user {user_id!r} is held by another operation past the "
                      f"wait; try again")


def boot_timeout(message: str) -> BootTimeout:
    return BootTimeout(message)


# ---- the HTTP edge's refusals: written by app/api/edge.py below the application -------------


class RequestTimeout(DomainError):
    """The request body was not whole within ORCH_BODY_TIMEOUT_S; a retry is safe."""

    code = "REQUEST_TIMEOUT"


class HeadersTooLarge(DomainError):
    code = "HEADERS_TOO_LARGE"


class ServerBusy(DomainError):
    """Past ORCH_LIMIT_CONCURRENCY with no slow client to close; retry after Retry-After."""

    code = "SERVER_BUSY"


class HttpVersionNotSupported(DomainError):
    code = "HTTP_VERSION_NOT_SUPPORTED"
