"""Task lifecycle (`Lifecycle: {"Hook", "Sidecar"}`) as Nomad 1.10.5's client runs it.

- The start gates: client/allocrunner/tasklifecycle/coordinator.go (Coordinator,
  nextStateLocked, enterStateLocked, isPrestartDone, isMainDone, isPoststartDone,
  isAllocDone, taskLifecycleStage). Prestart tasks run first; ephemeral ones must end
  successfully (dead, not failed) and sidecars be running before the main tasks start;
  poststart tasks start once no main task is pending; poststop tasks once every other task
  is dead.
- Restart on a successful exit: client/allocrunner/taskrunner/restarts/restarts.go
  NewRestartTracker (`onSuccess`: a prestart or poststart task restarts after exit 0 only
  when it is a sidecar; a poststop task never) and GetState ("Restart unnecessary as task
  terminated successfully": dead, not failed).
- What a dead task does to the others: client/allocrunner/alloc_runner.go
  handleTaskStateUpdates (a failed task kills every live non-poststop task, "Sibling Task
  Failed"; a dead leader kills them, "Leader Task Dead"; when only sidecars are left alive
  they are killed, "Main Tasks Dead") and killTasks (the leader first, then the other
  non-sidecar tasks together, then the sidecars; poststop tasks are left to run).
"""

from __future__ import annotations

import asyncio
from typing import Any

PRESTART_EPHEMERAL = "prestart-ephemeral"
PRESTART_SIDECAR = "prestart-sidecar"
MAIN = "main"
POSTSTART_EPHEMERAL = "poststart-ephemeral"
POSTSTART_SIDECAR = "poststart-sidecar"
POSTSTOP = "poststop"
STAGES = (PRESTART_EPHEMERAL, PRESTART_SIDECAR, MAIN, POSTSTART_EPHEMERAL,
          POSTSTART_SIDECAR, POSTSTOP)

# coordinator.go enterStateLocked: the stages each coordinator state lets start
OPEN = {
    "init": set(),
    "prestart": {PRESTART_EPHEMERAL, PRESTART_SIDECAR},
    "main": {PRESTART_SIDECAR, MAIN},
    "poststart": {PRESTART_SIDECAR, MAIN, POSTSTART_EPHEMERAL, POSTSTART_SIDECAR},
    "wait_alloc": {PRESTART_SIDECAR, MAIN, POSTSTART_SIDECAR},
    "poststop": {POSTSTOP},
}


def stage(task: dict[str, Any]) -> str:
    """coordinator.go taskLifecycleStage; a Lifecycle without a Hook is a main task
    (structs.Task.IsMain)."""
    lifecycle = task.get("Lifecycle") or {}
    hook, sidecar = lifecycle.get("Hook") or "", bool(lifecycle.get("Sidecar"))
    if hook in ("prestart", "poststart"):
        return f"{hook}-{'sidecar' if sidecar else 'ephemeral'}"
    return POSTSTOP if hook == "poststop" else MAIN


def is_sidecar(task: dict[str, Any]) -> bool:
    return bool((task.get("Lifecycle") or {}).get("Sidecar"))


def restarts_on_success(task: dict[str, Any]) -> bool:
    """restarts.go NewRestartTracker's onSuccess for a service job."""
    hook = (task.get("Lifecycle") or {}).get("Hook") or ""
    if hook in ("prestart", "poststart"):
        return is_sidecar(task)
    return hook != "poststop"


def lifecycles(group: dict[str, Any]) -> dict[str, Any] | None:
    """AllocatedResources.TaskLifecycles: each task's TaskLifecycleConfig, null for a main
    task (structs.AllocatedResources; scheduler/generic_sched.go fills it per task)."""
    out = {t["Name"]: ({"Hook": t["Lifecycle"]["Hook"],
                        "Sidecar": bool(t["Lifecycle"].get("Sidecar"))}
                       if (t.get("Lifecycle") or {}).get("Hook") else None)
           for t in group.get("Tasks") or []}
    return out or None


class Coordinator:
    """coordinator.go's state machine over the alloc's task states."""

    def __init__(self, tasks: list[dict[str, Any]]):
        self.by_stage: dict[str, list[str]] = {s: [] for s in STAGES}
        for task in tasks:
            self.by_stage[stage(task)].append(task["Name"])
        self.state = "init"
        self.changed = asyncio.Event()

    def allowed(self, stage_name: str) -> bool:
        return stage_name in OPEN[self.state]

    def poke(self) -> None:
        """Wake every task waiting at a gate (a state change, or a kill)."""
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait(self, stage_name: str, stopping: Any) -> None:
        """Until `stage_name` may start, or `stopping()` (the task was killed first)."""
        while not self.allowed(stage_name) and not stopping():
            await self.changed.wait()

    def update(self, states: dict[str, dict[str, Any]]) -> None:
        """coordinator.go TaskStateUpdated: move through every state the task states allow."""
        while True:
            nxt = self._next(states)
            if nxt == self.state:
                return
            self.state = nxt
            self.poke()

    def _next(self, states: dict[str, dict[str, Any]]) -> str:
        if self._alloc_done(states):
            return "poststop"
        done = {"init": lambda: all(s["State"] == "pending" for s in states.values()),
                "prestart": lambda: self._prestart_done(states),
                "main": lambda: all(states[t]["State"] != "pending"
                                    for t in self.by_stage[MAIN]),
                "poststart": lambda: all(states[t]["State"] == "dead"
                                         for t in self.by_stage[POSTSTART_EPHEMERAL]),
                "wait_alloc": lambda: False, "poststop": lambda: False}
        order = ["init", "prestart", "main", "poststart", "wait_alloc", "poststop"]
        if done[self.state]():
            return order[min(order.index(self.state) + 1, len(order) - 1)]
        return self.state

    def _prestart_done(self, states: dict[str, dict[str, Any]]) -> bool:
        # isPrestartDone: every ephemeral prestart task Successful (dead, not failed), every
        # prestart sidecar running
        return (all(states[t]["State"] == "dead" and not states[t]["Failed"]
                    for t in self.by_stage[PRESTART_EPHEMERAL])
                and all(states[t]["State"] == "running"
                        for t in self.by_stage[PRESTART_SIDECAR]))

    def _alloc_done(self, states: dict[str, dict[str, Any]]) -> bool:
        return all(states[t]["State"] == "dead" for s, names in self.by_stage.items()
                   if s != POSTSTOP for t in names)


def kill_reason(runners: list[Any]) -> dict[str, str] | None:
    """alloc_runner.go handleTaskStateUpdates: why the live non-poststop tasks must be
    killed now, as the TaskEvent's fields (Type, DisplayMessage...), or None."""
    reason: dict[str, str] | None = None
    live = []
    for runner in runners:
        if stage(runner.task) == POSTSTOP:
            continue
        if runner.ts["State"] != "dead":
            live.append(runner)
        elif runner.ts["Failed"]:
            reason = reason or {"Type": "Sibling Task Failed", "FailedSibling": runner.name,
                                "DisplayMessage": f'Task\'s sibling "{runner.name}" failed'}
        elif runner.task.get("Leader"):
            reason = {"Type": "Leader Task Dead", "DisplayMessage": "Leader Task in Group dead"}
    if not live:
        return None
    if reason is None and any(is_sidecar(r.task) for r in runners) \
            and all(is_sidecar(r.task) for r in live):
        reason = {"Type": "Main Tasks Dead", "DisplayMessage": "Main tasks in the group died"}
    return reason


async def kill_in_order(runners: list[Any], grace_cap: float | None = None) -> None:
    """alloc_runner.go killTasks: the leader first, then the other non-sidecar tasks
    together, then the sidecars together; poststop tasks are not killed (they run next)."""
    rest = [r for r in runners if stage(r.task) != POSTSTOP]
    leaders = [r for r in rest if r.task.get("Leader")]
    for runner in leaders[:1]:
        await runner.kill(grace_cap=grace_cap)
    others = [r for r in rest if r not in leaders[:1]]
    await asyncio.gather(*(r.kill(grace_cap=grace_cap) for r in others
                           if not is_sidecar(r.task)))
    await asyncio.gather(*(r.kill(grace_cap=grace_cap) for r in others if is_sidecar(r.task)))
