"""Really runs the tasks of an allocation: alloc dirs, templates, processes (each in its own
session, so signals reach the whole group), restart policy, kills, signals, and the
TaskState/TaskEvent history Nomad reports. Every state change bumps the index, so blocking
queries return.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.doubles import drivers, lifecycle, templates
from tests.doubles.state import Alloc, now_ns, rfc3339
from tests.doubles.task_templates import TemplateMixin, parse_signal

if TYPE_CHECKING:
    from tests.doubles.scheduler import Cluster

SECOND = 1_000_000_000
DEFAULT_RESTART = {"Attempts": 2, "Interval": 1800 * SECOND, "Delay": 15 * SECOND, "Mode": "fail"}
DEFAULT_KILL_TIMEOUT = 5 * SECOND
# The client's max_kill_timeout (command/agent/config.go default "30s"): a task's KillTimeout
# above it is cut to it (client/allocrunner/taskrunner NewDriverHandle; the Killing event's
# SetKillTimeout reports the cut value).
MAX_KILL_TIMEOUT = 30 * SECOND


def signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class TaskRunner(TemplateMixin):
    def __init__(self, cluster: Cluster, alloc: Alloc, task: dict[str, Any],
                 group: dict[str, Any], coordinator: lifecycle.Coordinator):
        self.cluster, self.alloc, self.task, self.group = cluster, alloc, task, group
        self.name: str = task["Name"]
        self.coordinator, self.stage = coordinator, lifecycle.stage(task)
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False           # a kill was asked for: an exit is not a failure
        self.restart_now = False        # a template's "restart" change mode
        self.wake = asyncio.Event()     # variables changed (templates may now render)
        self.rendered: dict[str, str] = {}
        self.reads: set[str] = set().union(*(templates.variable_paths(t.get("EmbeddedTmpl") or "")
                                             for t in task.get("Templates") or []))
        self.started_at = 0.0
        self.restarts_in_window: list[float] = []
        self.changed_first = self.changed_last = 0.0  # template quiescence (see _quiesce)
        self.quiescing: asyncio.Task[Any] | None = None
        self.dirs = self._make_dirs()
        self.env: dict[str, str] = {}
        alloc.task_states[self.name] = {"State": "pending", "Failed": False, "Restarts": 0,
                                        "LastRestart": None, "StartedAt": None,
                                        "FinishedAt": None, "Events": []}

    # ---- bookkeeping ---------------------------------------------------------------------

    @property
    def ts(self) -> dict[str, Any]:
        return self.alloc.task_states[self.name]

    def event(self, kind: str, message: str = "", **extra: Any) -> None:
        event = {"Type": kind, "Time": now_ns(), "DisplayMessage": message, "Details": {},
                 "Message": message, "FailsTask": False, "ExitCode": 0, "Signal": 0,
                 "DriverError": "", "KillTimeout": 0, "StartDelay": 0, "TaskSignal": "",
                 **extra}
        self.ts["Events"].append(event)
        self.cluster.alloc_changed(self.alloc)

    def _set(self, state: str, failed: bool = False) -> None:
        self.ts["State"] = state
        if failed:
            self.ts["Failed"] = True
        if state == "running":
            self.ts["StartedAt"] = rfc3339()
        if state == "dead":
            self.ts["FinishedAt"] = rfc3339()
        self.cluster.alloc_changed(self.alloc)
        self.cluster.task_state_changed(self.alloc)

    def _make_dirs(self) -> dict[str, str]:
        base = self.alloc.dir
        task_dir = base / self.name
        paths = {"alloc": base / "alloc", "task": task_dir, "local": task_dir / "local",
                 "secrets": task_dir / "secrets", "tmp": task_dir / "tmp",
                 "logs": base / "alloc" / "logs"}
        for path in paths.values():
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(paths["secrets"], 0o700)  # Nomad's secrets dir is private to the task
        return {k: str(v) for k, v in paths.items()}

    # ---- the task's life -----------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as exc:   # a bug of the double: fail the task loudly, not silently
            import traceback
            traceback.print_exc()
            self._fail("Setup Failure", f"the double failed: {exc!r}", SetupError=repr(exc))

    async def _run(self) -> None:
        self.event("Received", "Task received by client")
        # task_runner.go Run: the task's hooks and driver wait for its lifecycle gate
        await self.coordinator.wait(self.stage, lambda: self.stopping)
        if self.stopping:
            return self._set("dead")
        self.event("Task Setup", "Building Task Directory")
        try:
            drivers.check_config(self.task, self.group)
            self.env = self._environment()
            drivers.pull_image(self.task)
        except drivers.DriverError as exc:
            return self._fail("Driver Failure", str(exc), DriverError=str(exc))
        while not self.stopping:
            if not await self._render_all():
                return
            if self.stopping:
                break
            code, sig = await self._run_once()
            if self.stopping:
                break
            if self.restart_now:
                self.restart_now = False
                continue
            if not await self._after_exit(code, sig):
                return
        self._set("dead")

    def _environment(self) -> dict[str, str]:
        nomad_env = templates.task_env(self.alloc, self.task, self.dirs)
        meta = {k[len("NOMAD_META_"):]: v for k, v in nomad_env.items()
                if k.startswith("NOMAD_META_")}
        job_env = {k: templates.interpolate(v, nomad_env, meta)
                   for k, v in (self.task.get("Env") or {}).items()}
        env = {**drivers.base_env(job_env), **nomad_env, **job_env}
        if self.task["Driver"] == "docker":
            env = drivers.docker_view(env, self.task, self.alloc)
        return env

    async def _run_once(self) -> tuple[int, int]:
        config = templates.interpolate_any(self.task.get("Config") or {}, self.env, {})
        denied = drivers.container_denied(self.task, self.alloc, self.env)
        faults = self.cluster.state.faults
        cmd = (drivers.failing_cmd(self.name) if self.name in faults.fail_tasks else
               drivers.command(self.task, config,
                               faults.task_crash and self.stage == lifecycle.MAIN, denied))
        logs = Path(self.dirs["logs"])
        with open(logs / f"{self.name}.stdout.0", "ab") as out, \
                open(logs / f"{self.name}.stderr.0", "ab") as err:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *cmd, env=self.env, cwd=self.dirs["task"], stdin=asyncio.subprocess.DEVNULL,
                    stdout=out, stderr=err, start_new_session=True)
            except OSError as exc:
                self.proc = None
                return self._start_failed(exc)
        self.alloc.pids[self.name] = self.proc.pid
        self.started_at = time.monotonic()
        self.event("Started", "Task started by client")
        self._set("running")
        await self.cluster.services.task_started(self.alloc, self.task)
        rc = await self.proc.wait()
        self.alloc.pids.pop(self.name, None)
        await self.cluster.services.task_stopped(self.alloc, self.task)
        code, sig = (0, -rc) if rc < 0 else (rc, 0)
        self.event("Terminated", f"Exit Code: {code}" + (f", Signal: {sig}" if sig else ""),
                   ExitCode=code, Signal=sig)
        return code, sig

    def _start_failed(self, exc: OSError) -> tuple[int, int]:
        msg = f"failed to launch command with executor: {exc}"
        self.event("Driver Failure", msg, DriverError=msg)
        return -1, 0

    def _restart_policy(self) -> dict[str, Any]:
        policy = dict(DEFAULT_RESTART)
        for layer in (self.group.get("RestartPolicy"), self.task.get("RestartPolicy")):
            policy.update({k: v for k, v in (layer or {}).items() if v is not None})
        return policy

    async def _after_exit(self, code: int, sig: int) -> bool:
        """Apply the restart policy; False when the task is now dead for good."""
        if code == 0 and sig == 0 and not lifecycle.restarts_on_success(self.task):
            # restarts.go GetState: "Restart unnecessary as task terminated successfully"
            self._set("dead")
            return False
        policy = self._restart_policy()
        now = time.monotonic()
        window = policy["Interval"] / SECOND
        self.restarts_in_window = [t for t in self.restarts_in_window if now - t < window]
        delay = policy["Delay"] / SECOND
        if len(self.restarts_in_window) >= policy["Attempts"]:
            if policy["Mode"] != "delay":
                msg = (f"Exceeded allowed attempts {policy['Attempts']} in interval "
                       f"{_go_duration(policy['Interval'])} and mode is \"fail\"")
                self._fail("Not Restarting", msg)
                return False
            delay = window - (now - self.restarts_in_window[0]) + delay
            self.restarts_in_window = []
        self.restarts_in_window.append(now)
        self._set("pending")
        self.event("Restarting", f"Task restarting in {delay:.3f}s",
                   StartDelay=int(delay * SECOND), RestartReason="Restart within policy")
        await self._sleep_unless_stopped(delay)
        self.ts["Restarts"] += 1
        self.ts["LastRestart"] = rfc3339()
        return True

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _fail(self, kind: str, message: str, **extra: Any) -> None:
        self.event(kind, message, FailsTask=True, **extra)
        self._set("dead", failed=True)

    # ---- signals and kills ---------------------------------------------------------------

    def send(self, sig: signal.Signals) -> None:
        """To the task's main process, as raw_exec/exec's executor and docker's
        ContainerKill do; only the final SIGKILL reaches the whole group (see _terminate)."""
        if self.proc is not None and self.proc.returncode is None:
            signal_pid(self.proc.pid, sig)

    async def kill(self, hard: bool = False, grace_cap: float | None = None) -> None:
        """Stop the task for good: KillSignal, KillTimeout, then SIGKILL."""
        first = not self.stopping
        self.stopping = True
        self.wake.set()
        self.coordinator.poke()
        if self.proc is None or self.proc.returncode is not None:
            # alloc_runner.go killTasks: a Killing event for every task not finished, one
            # gated or between restarts too (no process: no Killed)
            if first and not hard and self.ts["FinishedAt"] is None:
                self.event("Killing", "Sent interrupt", KillTimeout=self._kill_timeout_ns())
            return
        if hard:
            signal_group(self.proc.pid, signal.SIGKILL)
            return
        self.event("Killing", "Sent interrupt", KillTimeout=self._kill_timeout_ns())
        await self._terminate(grace_cap)
        self.event("Killed", "Task successfully killed")

    def _kill_timeout_ns(self) -> int:
        value = self.task.get("KillTimeout")
        return min(DEFAULT_KILL_TIMEOUT if value is None else value, MAX_KILL_TIMEOUT)

    async def _terminate(self, grace_cap: float | None = None) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        grace = self._kill_timeout_ns() / SECOND
        if grace_cap is not None:
            grace = min(grace, grace_cap)
        # Only the KillSignal, then SIGKILL after KillTimeout (taskrunner's killTask ->
        # driver StopTask): a SIGSTOPped task stays stopped and never acts on the signal.
        self.send(parse_signal(self.task.get("KillSignal") or "SIGTERM"))
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=grace)
        except TimeoutError:
            self.send(signal.SIGKILL)
            await proc.wait()
        # drivers/shared/executor Shutdown ends with killProcessTree: SIGKILL to the group
        signal_group(proc.pid, signal.SIGKILL)


def _go_duration(ns: int) -> str:
    secs = ns / SECOND
    if secs >= 60 and secs % 60 == 0:
        minutes = int(secs // 60)
        return f"{minutes // 60}h{minutes % 60}m0s" if minutes >= 60 else f"{minutes}m0s"
    return f"{secs:g}s"
