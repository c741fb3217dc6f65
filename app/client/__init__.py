"""A typed Python client for the engine orchestrator's HTTP API (sync and asyncio).

    from app.client import Client, RateLimited

    with Client("http://127.0.0.1:8080", platform_key) as orch:
        admission = orch.admit("alice", auto_provision=True, auto_wake=True)

`Client` wraps httpx.Client, `AsyncClient` wraps httpx.AsyncClient; both have one method per
endpoint and raise one `OrchestratorError` subclass per error code of the API.
"""

from app.client._async import AsyncClient
from app.client._errors import (
    ERRORS_BY_CODE,
    BootTimeout,
    CapacityExhausted,
    DriverFailed,
    EngineAlreadyExists,
    EngineAlreadyRunning,
    EngineBusy,
    EngineNotFound,
    EngineNotRunning,
    HeadersTooLarge,
    HttpVersionNotSupported,
    IllegalTransition,
    Internal,
    InvalidRequest,
    KeyNotConfirmed,
    MethodNotAllowed,
    NotFound,
    OrchestratorError,
    PortExhaustion,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    RolloutFinished,
    SchedulerUnavailable,
    ServerBusy,
    Unauthorized,
    UnexpectedResponse,
    UpgradeFailed,
    error_from_response,
    raise_for_error,
)
from app.client._models import (
    Admission,
    Engine,
    EnginePage,
    Event,
    EventPage,
    Health,
    ProvisionedEngine,
    Rollout,
)
from app.client._sync import Client

__all__ = [
    "ERRORS_BY_CODE",
    "Admission",
    "AsyncClient",
    "BootTimeout",
    "CapacityExhausted",
    "Client",
    "DriverFailed",
    "Engine",
    "EngineAlreadyExists",
    "EngineAlreadyRunning",
    "EngineBusy",
    "EngineNotFound",
    "EngineNotRunning",
    "EnginePage",
    "Event",
    "EventPage",
    "HeadersTooLarge",
    "Health",
    "HttpVersionNotSupported",
    "IllegalTransition",
    "Internal",
    "InvalidRequest",
    "KeyNotConfirmed",
    "MethodNotAllowed",
    "NotFound",
    "OrchestratorError",
    "PortExhaustion",
    "ProvisionedEngine",
    "QuotaExceeded",
    "RateLimited",
    "RequestTimeout",
    "Rollout",
    "RolloutFinished",
    "SchedulerUnavailable",
    "ServerBusy",
    "Unauthorized",
    "UnexpectedResponse",
    "UpgradeFailed",
    "error_from_response",
    "raise_for_error",
]
