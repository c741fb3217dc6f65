"""The one table of error codes, and the server's error tree derived from it.

CODES is the only place a code is given its HTTP status, whether a retry is safe, and its
meaning. The API's status mapping (app/api/errors.py), the OpenAPI error responses
(app/api/openapi.py) and the Python client's exceptions (app/client/_errors.py) are all read
from it. Every code has one class, named after the code (PORT_EXHAUSTION: PortExhaustion), on
the server here and in the client; a subclass only narrows its parent's idea (BadVersion is an
InvalidRequest). tests/unit/test_structure.py fails on an error class outside the table.

This module imports nothing but the standard library: the client imports it.

    DomainError                      (INTERNAL: a bug)
    ├── InvalidRequest ── BadVersion
    ├── Unauthorized, EngineNotFound, NotFound, MethodNotAllowed
    ├── EngineAlreadyExists, EngineAlreadyRunning, EngineNotRunning, IllegalTransition
    ├── EngineBusy, RolloutFinished, QuotaExceeded, RateLimited
    ├── Busy, Conflict               (SCHEDULER_UNAVAILABLE: nothing was changed; try again)
    ├── KeyNotConfirmed, UpgradeFailed
    ├── SnapshotNotFound, SnapshotStoreFailed
    ├── DriverError                  raised by drivers; carries what was left running (`state`)
    │   ├── SchedulerUnavailable, PortExhaustion, CapacityExhausted ── NodeLost
    │   ├── BootTimeout, EngineCrashed   (BOOT_TIMEOUT)
    │   └── DriverFailed             anything else a driver raised (an OSError, a bug)
    └── RequestTimeout, HeadersTooLarge, ServerBusy, HttpVersionNotSupported  (the HTTP edge)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Code:
    code: str
    status: int
    retryable: bool  # True: nothing was changed, or a retry is safe; try again later
    meaning: str

    @property
    def class_name(self) -> str:
        """The exception's name on the server and in the client: the code in CamelCase."""
        return "".join(word.capitalize() for word in self.code.split("_"))


CODES: tuple[Code, ...] = (
    Code("INVALID_REQUEST", 400, False, "bad JSON, field, query or user_id; body over 64 KiB"),
    Code("UNAUTHORIZED", 401, False, "missing or unknown platform key"),
    Code("ENGINE_NOT_FOUND", 404, False, "no such engine in this product"),
    Code("NOT_FOUND", 404, False, "no such route, or no such rollout"),
    Code("SNAPSHOT_NOT_FOUND", 404, False, "no such snapshot of this engine"),
    Code("METHOD_NOT_ALLOWED", 405, False, "the route does not take this method"),
    Code("REQUEST_TIMEOUT", 408, True, "the request's body did not arrive in time"),
    Code("ENGINE_ALREADY_EXISTS", 409, False, "the user already has an engine"),
    Code("ENGINE_ALREADY_RUNNING", 409, False, "the engine is already running"),
    Code("ENGINE_NOT_RUNNING", 409, False, "the engine is not running"),
    Code("ILLEGAL_TRANSITION", 409, False,
         "the engine's state does not allow this operation (see the state table)"),
    Code("ROLLOUT_FINISHED", 409, False, "the rollout has already ended"),
    Code("ENGINE_BUSY", 409, True, "another operation held the engine past the wait"),
    Code("QUOTA_EXCEEDED", 429, False, "the product has max_engines engines, every state counted"),
    Code("RATE_LIMITED", 429, True, "over rate_limit_rpm admits a minute; wait Retry-After"),
    Code("HEADERS_TOO_LARGE", 431, False, "the request's header fields are too large"),
    Code("INTERNAL", 500, False, "a bug: logged with the request id"),
    Code("KEY_NOT_CONFIRMED", 502, True,
         "the engine did not confirm its new key; the old key still works"),
    Code("DRIVER_FAILED", 502, False,
         "the driver failed unexpectedly (an OS error or a bug); the engine's state is unknown"),
    Code("UPGRADE_FAILED", 502, False,
         "the new version did not come up; the engine runs its previous one"),
    Code("SNAPSHOT_STORE_FAILED", 502, True,
         "the snapshot store could not be read or written; no snapshot was listed or restored"),
    Code("PORT_EXHAUSTION", 503, True, "no free port"),
    Code("CAPACITY_EXHAUSTED", 503, True, "the scheduler cannot place the engine otherwise"),
    Code("SCHEDULER_UNAVAILABLE", 503, True,
         "Nomad, Consul or the database unreachable, or the engine held; nothing was changed"),
    Code("SERVER_BUSY", 503, True, "the server is at its connection limit"),
    Code("BOOT_TIMEOUT", 504, False, "not healthy within ORCH_BOOT_TIMEOUT_S"),
    Code("HTTP_VERSION_NOT_SUPPORTED", 505, False, "only HTTP/1.0 and HTTP/1.1 are served"),
)

BY_CODE: dict[str, Code] = {entry.code: entry for entry in CODES}
STATUS_BY_CODE: dict[str, int] = {entry.code: entry.status for entry in CODES}


class DomainError(Exception):
    """An error with a code of the table and a human `message`; it knows no HTTP."""

    code: ClassVar[str] = "INTERNAL"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code not in BY_CODE:
            raise TypeError(f"{cls.__name__}.code {cls.code!r} is not in app.errors.CODES")

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # seconds, for RATE_LIMITED

    @property
    def status(self) -> int:
        return BY_CODE[self.code].status

    @property
    def retryable(self) -> bool:
        return BY_CODE[self.code].retryable


class InvalidRequest(DomainError):
    code = "INVALID_REQUEST"


class BadVersion(InvalidRequest):
    """An engine_version the driver cannot run (SPEC "Additions"); the message says why."""


class Unauthorized(DomainError):
    code = "UNAUTHORIZED"


class EngineNotFound(DomainError):
    code = "ENGINE_NOT_FOUND"


class NotFound(DomainError):
    code = "NOT_FOUND"


class MethodNotAllowed(DomainError):
    code = "METHOD_NOT_ALLOWED"


class EngineAlreadyExists(DomainError):
    code = "ENGINE_ALREADY_EXISTS"


class EngineAlreadyRunning(DomainError):
    code = "ENGINE_ALREADY_RUNNING"


class EngineNotRunning(DomainError):
    code = "ENGINE_NOT_RUNNING"


class IllegalTransition(DomainError):
    """The state table forbids the move from the row's current state: a conflict with the
    engine's state, not a failure to retry blindly."""

    code = "ILLEGAL_TRANSITION"

    def __init__(self, event: str, state: str | None):
        super().__init__(f"cannot {event} an engine that is {state}")
        self.event, self.state = event, state


class RolloutFinished(DomainError):
    """Pause, resume or abort of a rollout that already ended."""

    code = "ROLLOUT_FINISHED"


class QuotaExceeded(DomainError):
    code = "QUOTA_EXCEEDED"


class RateLimited(DomainError):
    code = "RATE_LIMITED"


class Busy(DomainError):
    """Another operation held the engine past the wait; nothing was changed."""

    code = "SCHEDULER_UNAVAILABLE"


class EngineBusy(Busy):
    """The same, for an upgrade (another replica's, or an `orch engines upgrade`): the spec
    answers it with a 409. Nothing was changed; a retry is safe."""

    code = "ENGINE_BUSY"


class Conflict(DomainError):
    """A compare-and-set lost: the row changed since it was read; nothing was changed."""

    code = "SCHEDULER_UNAVAILABLE"


class KeyNotConfirmed(DomainError):
    """The engine did not accept the new key in time; the old key was put back."""

    code = "KEY_NOT_CONFIRMED"


class UpgradeFailed(DomainError):
    """The new version did not come up; the engine was put back on its previous version
    (running again, brain kept, unless that failed too: then it is failed)."""

    code = "UPGRADE_FAILED"


class DriverError(DomainError):
    """Raised by a driver. `state` is what was left running (None: nothing); `reason` is the
    engine's failure_reason and the audit reason when this error fails an engine."""

    code = "SCHEDULER_UNAVAILABLE"
    reason: ClassVar[str] = "placement_failed"

    def __init__(self, message: str, state: dict[str, Any] | None = None):
        super().__init__(message)
        self.state = state


class SchedulerUnavailable(DriverError):
    pass


class PortExhaustion(DriverError):
    code = "PORT_EXHAUSTION"
    reason = "port_exhausted"


class CapacityExhausted(DriverError):
    code = "CAPACITY_EXHAUSTED"


class NodeLost(CapacityExhausted):
    """The engine's node is down, and its brain with it: a 503, reason node_lost."""

    reason = "node_lost"


class BootTimeout(DriverError):
    code = "BOOT_TIMEOUT"
    reason = "boot_timeout"


class EngineCrashed(DriverError):
    """The engine's process or task ended while it was booting. The spec answers a boot that
    did not end healthy with BOOT_TIMEOUT; `reason` says what happened."""

    code = "BOOT_TIMEOUT"
    reason = "crashed"


class DriverFailed(DriverError):
    """Anything but a DomainError that escaped a driver call, wrapped at the driver's edge
    (app/drivers/instrumented.py) so that the callers' cleanup runs and the API answers it."""

    code = "DRIVER_FAILED"
    reason = "driver_failed"


class SnapshotNotFound(DomainError):
    code = "SNAPSHOT_NOT_FOUND"


class SnapshotStoreFailed(DomainError):
    """The store (a directory or an S3 bucket) failed; a snapshot cut short is never listed,
    and a restore that could not read the snapshot leaves the brain as it was."""

    code = "SNAPSHOT_STORE_FAILED"


# ---- the HTTP edge ------------------------------------------------------------------------------


class RequestTimeout(DomainError):
    code = "REQUEST_TIMEOUT"


class HeadersTooLarge(DomainError):
    code = "HEADERS_TOO_LARGE"


class ServerBusy(DomainError):
    code = "SERVER_BUSY"


class HttpVersionNotSupported(DomainError):
    code = "HTTP_VERSION_NOT_SUPPORTED"


# ---- factories (the messages in one place) ---------------------------------------------------


def invalid(message: str) -> InvalidRequest:
    return InvalidRequest(message)


def unauthorized() -> Unauthorized:
    return Unauthorized("missing or unknown X-Platform-Key")


def engine_not_found(user_id: str) -> EngineNotFound:
    return EngineNotFound(f"no engine for user {user_id!r}")


def already_exists(user_id: str) -> EngineAlreadyExists:
    return EngineAlreadyExists(f"user {user_id!r} already has an engine; use /admit for "
                               f"idempotent behaviour")


def already_running(user_id: str) -> EngineAlreadyRunning:
    return EngineAlreadyRunning(f"the engine of user {user_id!r} is already running")


def not_running(user_id: str, status: str) -> EngineNotRunning:
    return EngineNotRunning(f"the engine of user {user_id!r} is {status}, not running")


def quota_exceeded(limit: int) -> QuotaExceeded:
    return QuotaExceeded(f"the product already has its maximum of {limit} engines")


def rate_limited(retry_after: int) -> RateLimited:
    return RateLimited(f"too many admits; retry in {retry_after}s", retry_after=retry_after)


def busy(user_id: str) -> Busy:
    return Busy(f"the engine of user {user_id!r} is held by another operation; try again")


def engine_busy(user_id: str) -> EngineBusy:
    return EngineBusy(f"the engine of user {user_id!r} is held by another operation past the "
                      f"wait; try again")


def snapshot_not_found(user_id: str, snapshot_id: str) -> SnapshotNotFound:
    return SnapshotNotFound(f"the engine of user {user_id!r} has no snapshot {snapshot_id!r}")


def boot_timeout(message: str) -> BootTimeout:
    return BootTimeout(message)
