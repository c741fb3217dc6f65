"""An in-memory Driver for in-process tests of the runner, the Admitter and the Reconciler.

It keeps what a real driver would (which engines run, which are paused, which key each has)
and can be told to misbehave the ways real engines and schedulers do: boot slowly, never get
healthy, crash right after start, lose the scheduler, take long to stop. `gate(call)` holds a
call until the test releases it, so races are staged deterministically, not timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.drivers.base import (
    LEFTOVERS,
    BootTimeout,
    CapacityExhausted,
    Driver,
    EngineCrashed,
    EngineSpec,
    NodeLost,
    PortExhaustion,
    Probe,
    SchedulerUnavailable,
    State,
)


@dataclass
class FakeEngine:
    generation: int
    running: bool = True
    paused: bool = False
    healthy: bool = True
    key: str = ""  # the key the engine accepts
    server: asyncio.Server | None = None
    port: int = 9

    async def serve(self) -> None:
        """Answer HTTP like an engine: /health without auth, anything else with the key."""
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            auth = next((h.split(":", 1)[1].strip() for h in head[1:]
                         if h.lower().startswith("authorization:")), "")
            ok = self.running and not self.paused and (
                (path == "/health" and self.healthy) or auth == f"Bearer {self.key}")
            status = "200 OK" if ok else ("401 Unauthorized" if path != "/health" else "503 Busy")
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                         .encode())
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


@dataclass
class Behaviour:
    boot_s: float = 0.0  # slow boot: healthy this long after launch
    never_ready: bool = False  # never passes its health check
    crash_after_start: bool = False  # exits while booting
    scheduler_down: bool = False  # every call raises SchedulerUnavailable
    stop_s: float = 0.0  # slow stop (an engine that ignores SIGTERM until the grace runs out)
    ports_exhausted: bool = False
    http: bool = False  # engines answer HTTP on loopback (/health, and the key on every other route)
    ignores_sighup: bool = False  # set_key writes the key, but the engine keeps the old one
    never_ready_if: Callable[[EngineSpec], bool] | None = None  # these engines/versions only
    crash_if: Callable[[EngineSpec], bool] | None = None  # these exit while booting
    unplaceable_if: Callable[[EngineSpec], bool] | None = None  # these: CapacityExhausted at launch


@dataclass
class Gate:
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


class FakeDriver(Driver):
    name = "fake"

    def __init__(self, behaviour: Behaviour | None = None):
        self.behaviour = behaviour or Behaviour()
        self.engines: dict[str, FakeEngine] = {}
        self.destroyed: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.gates: dict[str, Gate] = {}
        self._generation = 0
        self.lost: set[str] = set()  # engines whose node is down, their brain with it
        self.nodes_back = False  # tidy may now remove what the state lists as left over

    def gate(self, call: str) -> Gate:
        """The next `call` waits (after `entered` is set) until `release` is set."""
        self.gates[call] = Gate()
        return self.gates[call]

    async def _call(self, call: str, name: str) -> None:
        self.calls.append((call, name))
        gate = self.gates.pop(call, None)
        if gate is not None:
            gate.entered.set()
            await gate.release.wait()
        if self.behaviour.scheduler_down:
            raise SchedulerUnavailable("the fake scheduler is down")

    # ---- Driver ------------------------------------------------------------------------

    async def create(self, spec: EngineSpec, api_key: str) -> State:
        await self._call("create", spec.name)
        if self.behaviour.ports_exhausted:
            raise PortExhaustion("no free port in the fake's range")
        return await self.launch(spec, {"slot": spec.name}, api_key)

    async def launch(self, spec: EngineSpec, state: State, api_key: str) -> State:
        await self._call("launch", spec.name)
        if spec.name in self.lost:
            raise NodeLost(f"the node of {spec.name} is down", state)
        if self.behaviour.unplaceable_if is not None and self.behaviour.unplaceable_if(spec):
            raise CapacityExhausted(f"no node can take {spec.name}")
        self._generation += 1
        old = self.engines.get(spec.name)
        if old is not None:
            old.close()
        engine = self.engines[spec.name] = FakeEngine(self._generation, key=api_key)
        if self.behaviour.http:
            await engine.serve()
        return {"slot": spec.name, "generation": self._generation}

    async def wait_ready(self, spec: EngineSpec, state: State, timeout: float) -> tuple[State, str]:
        await self._call("wait_ready", spec.name)
        engine = self._live(state)
        crash = self.behaviour.crash_if is not None and self.behaviour.crash_if(spec)
        if engine is None or self.behaviour.crash_after_start or crash:
            if engine is not None:
                engine.running = False
            raise EngineCrashed(f"engine {spec.name} exited while booting", state)
        never = self.behaviour.never_ready_if is not None and self.behaviour.never_ready_if(spec)
        if self.behaviour.never_ready or never or self.behaviour.boot_s > timeout:
            await asyncio.sleep(timeout)
            raise BootTimeout(f"engine {spec.name} was not healthy within {timeout:g}s", state)
        await asyncio.sleep(self.behaviour.boot_s)
        return state, f"http://127.0.0.1:{engine.port}"

    async def stop(self, spec: EngineSpec, state: State, grace: float) -> State:
        await self._call("stop", spec.name)
        engine = self._live(state)
        if engine is not None:
            engine.paused = False
            await asyncio.sleep(min(grace, self.behaviour.stop_s))
            engine.running = False
            engine.close()
        return {"slot": spec.name}

    async def pause(self, spec: EngineSpec, state: State) -> None:
        await self._call("pause", spec.name)
        engine = self._live(state)
        if engine is not None:
            engine.paused = True

    async def resume(self, spec: EngineSpec, state: State) -> bool:
        await self._call("resume", spec.name)
        engine = self._live(state)
        if engine is None:
            return False
        engine.paused = False
        return True

    async def set_key(self, spec: EngineSpec, state: State, api_key: str) -> None:
        await self._call("set_key", spec.name)
        engine = self._live(state)
        if engine is not None and not self.behaviour.ignores_sighup:
            engine.key = api_key

    async def destroy(self, spec: EngineSpec, state: State | None) -> None:
        await self._call("destroy", spec.name)
        engine = self.engines.get(spec.name)
        if engine is not None and engine.running:
            await asyncio.sleep(min(5.0, self.behaviour.stop_s))
        if engine is not None:
            engine.close()
        self.engines.pop(spec.name, None)
        self.destroyed.append(spec.name)

    async def probe(self, spec: EngineSpec, state: State) -> Probe:
        await self._call("probe", spec.name)
        engine = self._live(state)
        if spec.name in self.lost:
            return "node_lost"
        if engine is None:
            return "dead"
        if engine.paused:
            return "paused"
        return "healthy" if engine.healthy else "unhealthy"

    async def brain_available(self, spec: EngineSpec, state: State) -> bool:
        await self._call("brain_available", spec.name)
        return spec.name not in self.lost

    async def stranded(self, states: Mapping[str, State]) -> set[str]:
        await self._call("stranded", "")
        return {name for name in states if name in self.lost}

    async def tidy(self, spec: EngineSpec, state: State) -> State:
        await self._call("tidy", spec.name)
        if not self.nodes_back:
            return state
        return {k: v for k, v in state.items() if k != LEFTOVERS}

    async def list_names(self) -> set[str]:
        await self._call("list_names", "")
        return set(self.engines)

    async def ping(self) -> None:
        await self._call("ping", "")

    # ---- for tests -----------------------------------------------------------------------

    def _live(self, state: State | None) -> FakeEngine | None:
        """The engine `state` points at, if that incarnation still runs."""
        if not state:
            return None
        engine = self.engines.get(str(state.get("slot")))
        if engine is None or not engine.running or engine.generation != state.get("generation"):
            return None
        return engine

    def crash(self, name: str) -> None:
        self.engines[name].running = False
        self.engines[name].close()

    def running(self) -> set[str]:
        return {n for n, e in self.engines.items() if e.running}

    def as_dict(self) -> dict[str, Any]:
        return {n: vars(e) for n, e in self.engines.items()}
