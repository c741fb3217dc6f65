"""The embedded driver: engines are child processes on this machine.

Each engine runs in its own process group (its own session), listens on a port reserved in the
port pool it is given (`PortPool`: the registry's port table, shared by the replicas on this
host; the driver never imports the registry), keeps its brain under ORCH_BRAIN_ROOT/<name> and
reads its key from a 0600 file under <state dir>/run/<name>. Everything the driver knows about
a running engine is in the `state` dict stored on the engine's row (pid, its start time, port),
so a restarted orchestrator adopts the engines it finds alive.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from app import engine_http
from app.config import Settings
from app.drivers import _exits, _health, _process
from app.drivers._isolation import Isolation
from app.drivers.base import BootTimeout, Driver, EngineCrashed, EngineSpec, PortExhaustion, Probe, State

# What an engine inherits from our environment besides ORCH_ENGINE_ENV's names.
_INHERITED = ("PATH", "LANG")


class PortPool(Protocol):
    """Ports handed out to engines by name; what one holds no one else gets."""

    def reserve(self, name: str, low: int, high: int, usable: Callable[[int], bool]) -> int | None:
        """The first free port in [low, high] that `usable` accepts, now `name`'s."""

    def give_back(self, port: int) -> None: ...

    def release_all(self, name: str) -> None: ...

    def holders(self) -> set[str]:
        """The names holding a port."""


class LocalDriver(Driver):
    name = "local"

    def __init__(self, settings: Settings, ports: PortPool):
        self.settings = settings
        self.ports = ports
        self.brain_root = settings.brain_root.resolve()
        self.run_root = settings.run_dir.resolve()
        self.isolation = preflight(settings)
        self.http = engine_http.client()
        self.exits = _exits.ExitWatcher()  # a pidfd per engine
        # A kept-alive connection per engine, closed when checks stop using it.
        self.checks = _health.HealthChecks(idle_s=3 * settings.health_interval_s + 30)
        _process.raise_fd_limit()  # a pidfd and a connection per engine
        self.exits.subscribe(self.checks.drop)  # an engine that ended: its connection is dead
        self._scan = _process.EngineScan()  # the orphan sweep's, which remembers non-engines

    # ---- Driver interface ----------------------------------------------------------------

    def brain_dir(self, spec: EngineSpec) -> Path | None:
        return self._dirs(spec)[0]

    async def create(self, spec: EngineSpec, api_key: str) -> State:
        port = self._reserve_port(spec.name)
        try:
            return await self.launch(spec, {"port": port}, api_key)
        except BaseException:
            await self.destroy(spec, {"port": port})
            raise

    async def launch(self, spec: EngineSpec, state: State, api_key: str) -> State:
        port = state["port"]
        if not _bindable(port):  # someone took our port while the engine was stopped
            port = self._move_port(spec.name, port)
        brain, run = self._dirs(spec)
        self.isolation.engine_dir(brain, port, 0o2770, contents=True)
        self.isolation.engine_dir(run, port, 0o750)
        key_file = run / "api_key"
        self._write_key(key_file, api_key, port)
        env = self._env(spec, port, brain, key_file)
        # In a thread: a fork and the wait for its exec take 10-20 ms on a busy machine, and
        # a burst of cold boots on the event loop would hold up every answer meanwhile (a warm
        # pool's claims among them).
        proc = await asyncio.to_thread(_process.launch, list(self.settings.engine_cmd), env, run,
                                       run / "engine.log", self.isolation.popen_kwargs(port))
        started = _process.start_time(proc.pid)
        self.exits.watch(spec.name, proc.pid, started)
        return {"port": port, "pid": proc.pid, "started": started}

    async def wait_ready(self, spec: EngineSpec, state: State, timeout: float) -> tuple[State, str]:
        url = _url(state["port"])
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if self._status(state) == "dead":
                _process.reap(state["pid"])
                raise EngineCrashed(f"engine {spec.name} exited while booting", state)
            if await engine_http.healthy(self.http, url, timeout=max(0.05, min(1.0, timeout))):
                return state, url
            if time.monotonic() >= deadline:
                raise BootTimeout(f"engine {spec.name} was not healthy within {timeout:g}s", state)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    async def stop(self, spec: EngineSpec, state: State, grace: float) -> State:
        self.exits.forget(spec.name)  # an exit we cause is no news
        self.checks.drop(spec.name)
        pid = state.get("pid")
        if pid and self._status(state) != "dead":
            _process.signal_group(pid, signal.SIGTERM)
            _process.signal_group(pid, signal.SIGCONT)  # a paused engine must run to exit
            if not await self._wait_dead(state, grace):
                _process.signal_group(pid, signal.SIGKILL)
                await self._wait_dead(state, 5.0)
        if pid:
            _process.reap(pid)
        return {"port": state.get("port")}

    async def pause(self, spec: EngineSpec, state: State) -> None:
        if self._status(state) != "dead":
            _process.signal_group(state["pid"], signal.SIGSTOP)

    async def resume(self, spec: EngineSpec, state: State) -> bool:
        if not state.get("pid") or self._status(state) == "dead":
            return False
        return _process.signal_group(state["pid"], signal.SIGCONT)

    async def set_key(self, spec: EngineSpec, state: State, api_key: str) -> None:
        _, run = self._dirs(spec)
        self._write_key(run / "api_key", api_key, state["port"])
        if state.get("pid") and self._status(state) != "dead":
            os.kill(state["pid"], signal.SIGHUP)

    async def destroy(self, spec: EngineSpec, state: State | None) -> None:
        grace = min(self.settings.stop_grace_s, 5.0)
        if state and state.get("pid"):
            await self.stop(spec, state, grace)
        for pid in _process.engines_under(self.brain_root).get(spec.name, []):
            await self.stop(spec, {"pid": pid, "started": _process.start_time(pid)}, grace)
        brain, run = self._dirs(spec)
        shutil.rmtree(brain, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        self.ports.release_all(spec.name)

    async def probe(self, spec: EngineSpec, state: State) -> Probe:
        pid = state.get("pid")
        if not pid:
            return "dead"
        # A pid its pidfd still watches has not ended (its end is an event), so the
        # /proc read that tells dead, paused and running apart waits for a check that fails.
        if self.exits.watching(spec.name) != pid:
            early = self._probe_status(state)
            if early != "unhealthy":
                return early
        if await self.checks.healthy(spec.name, state["port"]):
            return "healthy"
        return self._probe_status(state)

    def _probe_status(self, state: State) -> Probe:
        status = self._status(state)
        return "dead" if status == "dead" else "paused" if status == "paused" else "unhealthy"

    async def list_names(self) -> set[str]:
        # Dot names are a restore's staging (app.snapshots.tree), never an engine's brain.
        names = {p.name for p in self.brain_root.iterdir() if not p.name.startswith(".")} \
            if self.brain_root.exists() else set()
        names |= self.ports.holders()
        # Reading every process's environ is a scan of /proc: off the event loop, which keeps
        # answering admits meanwhile.
        # The pids watched by their pidfd are known engines; only the others are read.
        known = self.exits.pids()
        names |= set(await asyncio.to_thread(self._scan.run, self.brain_root, known))
        return names

    def on_exit(self, listener: Callable[[str], None]) -> bool:
        self.exits.subscribe(listener)
        return True

    def watch(self, spec: EngineSpec, state: State) -> None:
        if state.get("pid"):
            self.exits.watch(spec.name, state["pid"], state.get("started"))

    async def close(self) -> None:
        self.exits.close()
        self.checks.close()
        await self.http.aclose()

    # ---- helpers ---------------------------------------------------------------------------

    def _dirs(self, spec: EngineSpec) -> tuple[Path, Path]:
        # spec.name is [a-z0-9-] (app.naming), so these never leave their roots.
        return self.brain_root / spec.name, self.run_root / spec.name

    def _env(self, spec: EngineSpec, port: int, brain: Path, key_file: Path) -> dict[str, str]:
        # An allowlist, not a denylist: whatever tokens our environment holds (cloud, database,
        # scheduler) reach no engine unless the operator names them in ORCH_ENGINE_ENV.
        names = _INHERITED + self.settings.engine_env
        env = {k: os.environ[k] for k in names if k in os.environ}
        env.update(HOME=str(brain), ENGINE_PORT=str(port), ENGINE_HOST="127.0.0.1",
                   ENGINE_BRAIN_DIR=str(brain),
                   ENGINE_API_KEY_FILE=str(key_file), ENGINE_USER_ID=spec.user_id,
                   ENGINE_VERSION=spec.version)
        return env

    def _write_key(self, path: Path, value: str, port: int) -> None:
        # Written aside and renamed, so the engine never reads half a key.
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            self.isolation.key_file_mode(fd, port)
            f.write(value)
        os.replace(tmp, path)

    def _status(self, state: State) -> str:
        return _process.status(state["pid"], state.get("started")) if state.get("pid") else "dead"

    async def _wait_dead(self, state: State, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            _process.reap(state["pid"])
            if self._status(state) == "dead":
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)

    def _reserve_port(self, name: str) -> int:
        low, high = self.settings.port_range
        port = self.ports.reserve(name, low, high, _bindable)
        if port is None:
            raise PortExhaustion(f"no free port in ORCH_PORT_RANGE {low}-{high}")
        return port

    def _move_port(self, name: str, old: int) -> int:
        port = self._reserve_port(name)
        self.ports.give_back(old)
        return port


def preflight(settings: Settings) -> Isolation:
    """Make the roots, with their modes, and check that engines can reach them and their
    command: a ConfigError (one line) before serving, instead of every provision failing."""
    isolation = Isolation.from_settings(settings)
    for root in (settings.state_dir, settings.brain_root, settings.run_dir):
        isolation.prepare_root(root.resolve())
        isolation.check_reachable(root.resolve(), "allow o+x on it, or move ORCH_STATE_DIR")
    isolation.check_command(settings.engine_cmd)
    return isolation


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
