"""The one backend interface. `local` and `nomad` implement it.

A driver knows how to run an engine; it knows nothing of products, quotas or states. The
lifecycle module calls it and keeps the driver's `state` (a JSON-serialisable dict: pid and
port, or job, allocation and volume ids) on the engine's row, and hands it back on every call,
so a driver holds no state of its own that a restart of the orchestrator would lose.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Literal

State = dict[str, Any]  # driver-private, JSON-serialisable
Probe = Literal["healthy", "unhealthy", "paused", "dead"]


@dataclass(frozen=True)
class EngineSpec:
    name: str  # external name: [a-z0-9-], <= 63 chars; Nomad job ID, Consul service, brain dir
    product: str
    user_id: str
    version: str  # engine_version: the image (nomad) or the ENGINE_VERSION (local)


class DriverError(Exception):
    """A failure the API reports with its own status and code."""

    status = 503
    code = "SCHEDULER_UNAVAILABLE"

    def __init__(self, message: str, state: State | None = None):
        super().__init__(message)
        self.state = state  # what was left running, when anything was (None: nothing)


class PortExhausted(DriverError):
    code = "PORT_EXHAUSTION"


class CapacityExhausted(DriverError):
    code = "CAPACITY_EXHAUSTED"


class SchedulerUnavailable(DriverError):
    code = "SCHEDULER_UNAVAILABLE"


class BootTimeout(DriverError):
    status, code = 504, "BOOT_TIMEOUT"


class EngineCrashed(DriverError):
    """The engine's process or task ended while it was booting."""

    status, code = 504, "BOOT_TIMEOUT"


class Driver(abc.ABC):
    name: str

    @abc.abstractmethod
    async def create(self, spec: EngineSpec, api_key: str) -> State:
        """Reserve what the engine needs (port or volume, key) and launch it; don't wait.

        Raises PortExhausted, CapacityExhausted or SchedulerUnavailable, and then leaves
        nothing behind: no process, job, volume, variable or port.
        """

    @abc.abstractmethod
    async def launch(self, spec: EngineSpec, state: State, api_key: str) -> State:
        """Cold-start an engine that was created before and is not running, same brain."""

    @abc.abstractmethod
    async def wait_ready(self, spec: EngineSpec, state: State, timeout: float) -> tuple[State, str]:
        """Wait until the engine's health check passes; return (state, url).

        Raises BootTimeout when `timeout` passes first, EngineCrashed when the engine died.
        """

    @abc.abstractmethod
    async def stop(self, spec: EngineSpec, state: State, grace: float) -> State:
        """SIGTERM, `grace` seconds, then SIGKILL. The brain stays. Idempotent."""

    @abc.abstractmethod
    async def pause(self, spec: EngineSpec, state: State) -> None:
        """Freeze the engine (SIGSTOP) without losing its process or URL."""

    @abc.abstractmethod
    async def resume(self, spec: EngineSpec, state: State) -> bool:
        """Thaw a paused engine (SIGCONT). False when there is nothing left to thaw."""

    @abc.abstractmethod
    async def set_key(self, spec: EngineSpec, state: State, api_key: str) -> None:
        """Deliver a new key to the engine's key file and make it re-read it (SIGHUP)."""

    @abc.abstractmethod
    async def destroy(self, spec: EngineSpec, state: State | None) -> None:
        """Remove the engine and everything it had: process/job, brain, port, key. Idempotent."""

    @abc.abstractmethod
    async def probe(self, spec: EngineSpec, state: State) -> Probe:
        """What the engine is doing right now, cheaply."""

    @abc.abstractmethod
    async def list_names(self) -> set[str]:
        """Names of every engine this driver holds resources for (for the reconciler)."""

    async def ping(self) -> None:  # noqa: B027 - optional: a driver with no backend has nothing to ping
        """Raise SchedulerUnavailable when the backend cannot be reached."""

    async def close(self) -> None:  # noqa: B027 - optional: nothing to release by default
        """Release connections; engines keep running."""
