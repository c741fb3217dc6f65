"""The one backend interface. `local` and `nomad` implement it.

A driver knows how to run an engine; it knows nothing of products, quotas or states. The
operations' bodies (app.bodies) call it and keep what it returns (a JSON-serialisable dict: pid
and port, or job, allocation and volume ids) on the engine's row as `driver_state`, and hand it
back on every call, so a driver holds no state of its own that a restart of the orchestrator
would lose. Drivers raise the domain errors of app.errors (re-exported below), never an HTTP
status.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Drivers raise domain errors (app.errors), re-exported here under the names drivers use. Any
# other exception that escapes a driver call is wrapped into DriverFailed by Instrumented.
from app.errors import (
    BadVersion,
    BootTimeout,
    CapacityExhausted,
    DriverError,
    DriverFailed,
    EngineCrashed,
    NodeLost,
    PortExhaustion,
    SchedulerUnavailable,
)

__all__ = ["LEFTOVERS", "BadVersion", "BootTimeout", "CapacityExhausted", "Driver", "DriverError",
           "DriverFailed", "EngineCrashed", "EngineSpec", "NodeLost", "PortExhaustion", "Probe",
           "SchedulerUnavailable", "State"]

State = dict[str, Any]  # driver-private, JSON-serialisable
# A key of a driver's state: what the driver must remove later (a volume on a node that is
# down). The reconciler calls `tidy` for rows whose state holds it.
LEFTOVERS = "leftovers"
# "node_lost": the engine's node is gone, and its brain with it until it returns.
Probe = Literal["healthy", "unhealthy", "paused", "dead", "node_lost"]


@dataclass(frozen=True)
class EngineSpec:
    name: str  # external name: [a-z0-9-], <= 63 chars; Nomad job ID, Consul service, brain dir
    product: str
    user_id: str
    engine_version: str  # the image (nomad) or the ENGINE_VERSION (local)

    @property
    def version(self) -> str:
        """The old name of `engine_version`, kept while the drivers move over."""
        return self.engine_version


class Driver(abc.ABC):
    name: str

    def brain_dir(self, spec: EngineSpec) -> Path | None:
        """The engine's brain as a directory this process can read and write (the local
        driver's), or None where the brain lives elsewhere."""
        return None

    # ---- brains kept where the orchestrator cannot read them (Nomad's host volumes) ---------
    # A driver whose `brain_dir` is None may copy brains from where they live instead; then
    # `remote_snapshots` is True and the four calls below work. The operations call them under
    # the engine's lease, as every other call here.

    def remote_snapshots(self) -> bool:
        """True when `copy_brain`, `brain_fingerprint`, `restore_brain` and `tidy` work
        (Nomad, with a job template that has the `snapshot` task)."""
        return False

    async def brain_fingerprint(self, spec: EngineSpec, state: State) -> str:
        """The brain's fingerprint (app.snapshots.tree.fingerprint), read where it lives.

        May be called while the engine's allocation runs (running, or sleeping paused);
        otherwise raises EngineNotRunning.
        """
        raise NotImplementedError(f"the {self.name} driver does not take snapshots")

    async def copy_brain(self, spec: EngineSpec, state: State) -> dict[str, Any]:
        """Copy the brain's files into the snapshot store, where it lives; returns
        {"size_bytes", "new_bytes", "dirs", "files", "fingerprint"} (app.snapshots.tree.Taken,
        and the fingerprint taken before the copy). The manifest is the caller's to write.

        When and what it raises: as `brain_fingerprint`; SnapshotStoreFailed when the store
        refused the copy.
        """
        raise NotImplementedError(f"the {self.name} driver does not take snapshots")

    async def restore_brain(self, spec: EngineSpec, state: State, source: str, snapshot_id: str,
                            *, elsewhere: bool = False,
                            save: Callable[[State], None] | None = None) -> State:
        """Give the engine a new brain holding snapshot `snapshot_id` of engine `source`.

        Called once the engine is stopped (or its node is lost). Creates the new brain (on
        another node when `elsewhere`), and returns a state whose next `launch` fills it before
        the engine starts; every launch fills it again until `wait_ready` succeeds, so a
        restore cut short is redone. The old brain is listed under LEFTOVERS and removed once
        the restored engine is ready (or by `tidy`, when its node is back). Before creating
        anything, the driver hands `save` a state that lists the new brain under LEFTOVERS, so
        an orchestrator killed half-way leaves a row whose `tidy` removes it. Raises
        CapacityExhausted when no node can hold the new brain.
        """
        raise NotImplementedError(f"the {self.name} driver does not restore brains")

    async def stranded(self, states: Mapping[str, State]) -> set[str]:
        """Of these engines (name -> state), those whose brain is on a node that is down now:
        one call for many, cheap when every node is up. Called by the reconciler for engines
        nothing else watches (sleeping ones). Default: none."""
        return set()

    async def tidy(self, spec: EngineSpec, state: State) -> State:
        """Remove what `state[LEFTOVERS]` lists and can be removed now (its node is back);
        returns the state without it. Cheap when there is nothing. May be called in any
        state of the engine, under its lease: the reconciler calls it for rows whose state
        holds LEFTOVERS."""
        return state

    @abc.abstractmethod
    async def create(self, spec: EngineSpec, api_key: str) -> State:
        """Reserve what the engine needs (port or volume, key) and launch it; don't wait.

        Raises PortExhaustion, CapacityExhausted or SchedulerUnavailable, and then leaves
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

    async def claimed(self, spec: EngineSpec, state: State) -> None:
        """A warm pool's engine is now `spec.user_id`'s: show it where the backend shows
        engines (Nomad: the job's meta and Consul service), without restarting it. The engine
        itself was told already (app/CONTRACT.md). Default: nothing to show."""
        return None

    async def brain_available(self, spec: EngineSpec, state: State) -> bool:
        """Can the engine's brain be reached now? False while it is on a node that is down.
        Called for a failed engine before a restart is spent on it. Default: always."""
        return True

    def check_version(self, version: str) -> None:
        """Raise BadVersion for an engine_version this driver refuses (default: none)."""
        return None

    # Drivers that learn of an engine's end as an event (the local driver's pidfds)
    # tell the reconciler at once, rather than waiting for its next health check.
    def on_exit(self, listener: Callable[[str], None]) -> bool:
        """Have `listener(name)` called when an engine ends. False: no such events here."""
        return False

    def watch(self, spec: EngineSpec, state: State) -> None:
        """Start watching a running engine found in the registry (adopted after a restart)."""
        return None

    async def ping(self) -> None:
        """Raise SchedulerUnavailable when the backend cannot be reached."""
        return None

    async def close(self) -> None:
        """Release connections; engines keep running."""
        return None
