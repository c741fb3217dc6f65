"""The driver's edge: a Driver that times every call of another, counts its errors by call
name, and wraps anything a driver raises that is not a domain error (an OSError, a KeyError
from a bug) into DriverFailed, so that the callers' cleanup runs and the API answers it in the
contract's shape instead of a 500."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app import metrics
from app.drivers.base import Driver, DriverError, DriverFailed, EngineSpec, Probe, State
from app.errors import DomainError

log = logging.getLogger("orch.drivers")


class Instrumented(Driver):
    def __init__(self, inner: Driver):
        self.inner = inner
        self.name = inner.name

    @contextmanager
    def _measure(self, call: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except DomainError as exc:
            metrics.DRIVER_ERRORS.labels(self.name, call, exc.code).inc()
            raise
        except Exception as exc:
            metrics.DRIVER_ERRORS.labels(self.name, call, DriverFailed.code).inc()
            raise _wrapped(self.name, call, exc) from exc
        finally:
            metrics.DRIVER_SECONDS.labels(self.name, call).observe(time.perf_counter() - started)

    @contextmanager
    def _edge(self, call: str) -> Iterator[None]:
        """The wrapping alone, for the quick synchronous calls that are not timed."""
        try:
            yield
        except DomainError:
            raise
        except Exception as exc:
            raise _wrapped(self.name, call, exc) from exc

    def brain_dir(self, spec: EngineSpec) -> Path | None:
        return self.inner.brain_dir(spec)

    def remote_snapshots(self) -> bool:
        return self.inner.remote_snapshots()

    async def brain_fingerprint(self, spec: EngineSpec, state: State) -> str:
        with self._measure("brain_fingerprint"):
            return await self.inner.brain_fingerprint(spec, state)

    async def copy_brain(self, spec: EngineSpec, state: State) -> dict[str, Any]:
        with self._measure("copy_brain"):
            return await self.inner.copy_brain(spec, state)

    async def restore_brain(self, spec: EngineSpec, state: State, source: str, snapshot_id: str,
                            *, elsewhere: bool = False,
                            save: Callable[[State], None] | None = None) -> State:
        with self._measure("restore_brain"):
            return await self.inner.restore_brain(spec, state, source, snapshot_id,
                                                   elsewhere=elsewhere, save=save)

    async def stranded(self, states: Mapping[str, State]) -> set[str]:
        with self._measure("stranded"):
            return await self.inner.stranded(states)

    async def brain_available(self, spec: EngineSpec, state: State) -> bool:
        with self._measure("brain_available"):
            return await self.inner.brain_available(spec, state)

    async def tidy(self, spec: EngineSpec, state: State) -> State:
        with self._measure("tidy"):
            return await self.inner.tidy(spec, state)

    async def create(self, spec: EngineSpec, api_key: str) -> State:
        with self._measure("create"):
            return await self.inner.create(spec, api_key)

    async def launch(self, spec: EngineSpec, state: State, api_key: str) -> State:
        with self._measure("launch"):
            return await self.inner.launch(spec, state, api_key)

    async def wait_ready(self, spec: EngineSpec, state: State, timeout: float) -> tuple[State, str]:
        with self._measure("wait_ready"):
            return await self.inner.wait_ready(spec, state, timeout)

    async def stop(self, spec: EngineSpec, state: State, grace: float) -> State:
        with self._measure("stop"):
            return await self.inner.stop(spec, state, grace)

    async def pause(self, spec: EngineSpec, state: State) -> None:
        with self._measure("pause"):
            await self.inner.pause(spec, state)

    async def resume(self, spec: EngineSpec, state: State) -> bool:
        with self._measure("resume"):
            return await self.inner.resume(spec, state)

    async def set_key(self, spec: EngineSpec, state: State, api_key: str) -> None:
        with self._measure("set_key"):
            await self.inner.set_key(spec, state, api_key)

    async def claimed(self, spec: EngineSpec, state: State) -> None:
        with self._measure("claimed"):
            await self.inner.claimed(spec, state)

    async def destroy(self, spec: EngineSpec, state: State | None) -> None:
        with self._measure("destroy"):
            await self.inner.destroy(spec, state)

    async def probe(self, spec: EngineSpec, state: State) -> Probe:
        with self._measure("probe"):
            return await self.inner.probe(spec, state)

    async def list_names(self) -> set[str]:
        with self._measure("list_names"):
            return await self.inner.list_names()

    def check_version(self, version: str) -> None:
        with self._edge("check_version"):
            self.inner.check_version(version)

    def on_exit(self, listener: Callable[[str], None]) -> bool:
        with self._edge("on_exit"):
            return self.inner.on_exit(listener)

    def watch(self, spec: EngineSpec, state: State) -> None:
        with self._edge("watch"):
            self.inner.watch(spec, state)

    async def ping(self) -> None:
        with self._measure("ping"):
            await self.inner.ping()

    async def close(self) -> None:
        with self._edge("close"):
            await self.inner.close()


def _wrapped(driver: str, call: str, exc: Exception) -> DriverError:
    # The traceback is logged here, where it is still whole: an unexpected error may be a bug.
    log.error("%s driver: %s failed", driver, call, exc_info=exc)
    # The answer names the kind of failure only: paths and values stay in the log.
    detail = type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        detail += f": {exc.strerror}"
    return DriverFailed(f"the {driver} driver's {call} failed ({detail}); the log has the "
                        f"details")
