"""The double's one-node cluster: job registration, evaluations, placement (ports, host
volumes, faults), allocation runners, stops, node loss and shutdown.

Evaluations are processed before the register call answers (so a test can read the eval at
once), except that a replacement allocation waits for the allocation it replaces to stop.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from typing import Any

from tests.doubles import jobcheck
from tests.doubles.checks import ServiceManager
from tests.doubles.state import NODE_ID, Alloc, State, new_id, now_ns
from tests.doubles.tasks import TaskRunner

SERVER_FIELDS = ("Status", "StatusDescription", "Stable", "Version", "SubmitTime",
                 "CreateIndex", "ModifyIndex", "JobModifyIndex", "Stop")
PORT_FAIL = "network: dynamic port selection failed"


class Cluster:
    def __init__(self, state: State):
        self.state = state
        self.services = ServiceManager(state)
        self.runners: dict[str, list[TaskRunner]] = {}
        self.background: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run `coro` in the background, kept referenced until done (and awaited at close)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    # ---- jobs ----------------------------------------------------------------------------

    def register(self, job: dict[str, Any]) -> dict[str, Any]:
        """Store the job, evaluate it and answer a JobRegisterResponse."""
        jid = job["ID"]
        old = self.state.jobs.get(jid)
        submitted = {k: v for k, v in job.items() if k not in SERVER_FIELDS}
        unchanged = old is not None and not old["Stop"] and old["_submitted"] == submitted
        index = self.state.bump()
        stored = jobcheck.with_defaults(submitted)
        stored.update({"Stop": False, "Status": "pending", "StatusDescription": "",
                       "Stable": False, "SubmitTime": now_ns(), "_submitted": submitted,
                       "Version": (old["Version"] + (0 if unchanged else 1)) if old else 0,
                       "CreateIndex": old["CreateIndex"] if old else index,
                       "ModifyIndex": index, "JobModifyIndex": index})
        self.state.jobs[jid] = stored
        ev = self._new_eval(stored, "job-register")
        if not unchanged or self._wants_replacement(jid):
            self._evaluate(stored, ev)
        else:
            self._finish_eval(ev, {})   # nothing to change: a no-op plan
        return {"EvalID": ev["ID"], "EvalCreateIndex": ev["CreateIndex"],
                "JobModifyIndex": stored["JobModifyIndex"], "Warnings": "",
                "Index": self.state.index, "LastContact": 0, "KnownLeader": True}

    def _wants_replacement(self, jid: str) -> bool:
        # An unchanged job is a no-op while its alloc lives, and after it failed (Nomad does
        # not replace a failed alloc whose reschedule policy is spent). A lost or completed
        # alloc is replaced.
        allocs = self.state.job_allocs(jid)
        if not allocs:
            return True
        if any(not a.terminal for a in allocs):
            return False
        return allocs[-1].client_status != "failed"

    def deregister(self, jid: str, purge: bool) -> dict[str, Any]:
        job = self.state.jobs.get(jid)
        if job is None:
            return {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0,
                    "Index": self.state.index, "LastContact": 0, "KnownLeader": True}
        index = self.state.bump()
        job.update({"Stop": True, "ModifyIndex": index, "JobModifyIndex": index})
        ev = self._new_eval(job, "job-deregister")
        for alloc in self.state.job_allocs(jid):
            if not alloc.terminal:
                self.stop_alloc(alloc)
        if purge:
            del self.state.jobs[jid]
        self._finish_eval(ev, {})
        return {"EvalID": ev["ID"], "EvalCreateIndex": ev["CreateIndex"],
                "JobModifyIndex": index, "Index": self.state.index, "LastContact": 0,
                "KnownLeader": True}

    def job_status(self, job: dict[str, Any]) -> str:
        allocs = self.state.job_allocs(job["ID"])
        if any(not a.terminal for a in allocs):
            return "running"
        return "dead" if job["Stop"] or allocs else "pending"

    # ---- evaluations and placement -------------------------------------------------------

    def _new_eval(self, job: dict[str, Any], trigger: str,
                  status: str = "pending") -> dict[str, Any]:
        index = self.state.bump()
        ev = {"ID": new_id(), "Priority": job.get("Priority", 50), "Type": job.get("Type"),
              "TriggeredBy": trigger, "Namespace": job.get("Namespace", "default"),
              "JobID": job["ID"], "JobModifyIndex": job["JobModifyIndex"], "NodeID": "",
              "NodeModifyIndex": 0, "DeploymentID": "", "Status": status,
              "StatusDescription": "", "Wait": 0, "NextEval": "", "PreviousEval": "",
              "BlockedEval": "", "RelatedEvals": None, "FailedTGAllocs": None,
              "ClassEligibility": None, "EscapedComputedClass": False,
              "QuotaLimitReached": "", "AnnotatePlan": False, "QueuedAllocations": {},
              "SnapshotIndex": index, "CreateIndex": index, "ModifyIndex": index,
              "CreateTime": now_ns(), "ModifyTime": now_ns()}
        self.state.evals[ev["ID"]] = ev
        return ev

    def _finish_eval(self, ev: dict[str, Any], failed: dict[str, Any]) -> None:
        ev.update({"Status": "complete", "FailedTGAllocs": failed or None,
                   "ModifyIndex": self.state.bump(), "ModifyTime": now_ns()})

    def _evaluate(self, job: dict[str, Any], ev: dict[str, Any]) -> None:
        previous = [a for a in self.state.job_allocs(job["ID"]) if not a.terminal]
        for alloc in previous:   # a destructive update: the plan stops the old alloc first
            self.stop_alloc(alloc)
        failed: dict[str, Any] = {}
        queued: dict[str, int] = {}
        for group in job.get("TaskGroups") or []:
            for _ in range(group.get("Count", 1)):
                metric = self._place(job, group, ev, previous)
                if metric:
                    failed[group["Name"]] = metric
                    queued[group["Name"]] = queued.get(group["Name"], 0) + 1
        ev["QueuedAllocations"] = queued
        if failed:
            blocked = self._new_eval(job, "queued-allocs", status="blocked")
            blocked["PreviousEval"] = ev["ID"]
            ev["BlockedEval"] = blocked["ID"]
        self._finish_eval(ev, failed)

    def _place(self, job: dict[str, Any], group: dict[str, Any], ev: dict[str, Any],
               previous: list[Alloc]) -> dict[str, Any] | None:
        """Place one alloc of `group`; the AllocationMetric of the failure, or None."""
        volumes, missing = self._volumes(group)
        if missing:
            return _metric(constraint={"missing compatible host volumes": 1})
        if self.state.faults.memory_exhausted:
            return _metric(dimension={"memory": 1})
        ports = self._ports(group)
        if ports is None:
            return _metric(dimension={PORT_FAIL: 1})
        index = self.state.bump()
        alloc = Alloc(id=new_id(), job_id=job["ID"], eval_id=ev["ID"], group=group["Name"],
                      job=job, ports=ports, volumes=volumes,
                      dir=self.state.data_dir / "allocs", create_index=index,
                      modify_index=index)
        alloc.dir = alloc.dir / alloc.id
        self.state.allocs[alloc.id] = alloc
        ev["NodeID"] = NODE_ID
        self.runners[alloc.id] = [TaskRunner(self, alloc, t, group) for t in group["Tasks"]]
        self.spawn(self._run_alloc(alloc, previous))
        return None

    def _volumes(self, group: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], bool]:
        found: dict[str, dict[str, Any]] = {}
        for name, req in (group.get("Volumes") or {}).items():
            vol = self.state.volume_by_name(req.get("Source") or "")
            if req.get("Type") != "host" or vol is None or vol["State"] != "ready":
                return {}, True
            found[name] = vol
        return found, False

    def _ports(self, group: dict[str, Any]) -> dict[str, int] | None:
        """label -> host port, or None when a dynamic port cannot be found."""
        held = {p for a in self.state.live_allocs() if a.desired == "run"
                for p in a.ports.values()}
        ports: dict[str, int] = {}
        for net in group.get("Networks") or []:
            for port in net.get("ReservedPorts") or []:
                ports[port["Label"]] = port["Value"]
                held.add(port["Value"])
            for port in net.get("DynamicPorts") or []:
                value = self._free_port(held)
                if value is None:
                    return None
                ports[port["Label"]] = value
                held.add(value)
        return ports

    def _free_port(self, held: set[int]) -> int | None:
        if self.state.faults.ports_exhausted:
            return None
        low, high = self.state.port_range
        for port in range(low, high + 1):
            if port not in held and _bindable(port):
                return port
        return None

    # ---- allocations ---------------------------------------------------------------------

    async def _run_alloc(self, alloc: Alloc, previous: list[Alloc]) -> None:
        while any(not p.terminal for p in previous):
            await asyncio.sleep(0.05)   # Nomad's client waits for the replaced alloc
        if alloc.desired != "run":
            return
        await asyncio.gather(*(r.run() for r in self.runners.get(alloc.id, [])))

    def alloc_changed(self, alloc: Alloc) -> None:
        """A task state changed: derive the alloc's ClientStatus as Nomad's client does."""
        if alloc.client_status != "lost":
            states = alloc.task_states.values()
            if any(s["Failed"] for s in states):
                alloc.client_status, alloc.client_description = "failed", "Failed tasks"
            elif any(s["State"] == "running" for s in states):
                alloc.client_status, alloc.client_description = "running", "Tasks are running"
            elif any(s["State"] == "pending" for s in states):
                alloc.client_status, alloc.client_description = "pending", "No tasks have started"
            else:
                alloc.client_status = "complete"
                alloc.client_description = "All tasks have completed"
        if alloc.terminal:
            self.services.deregister_alloc(alloc)
        alloc.modify_index, alloc.modify_time = self.state.bump(), now_ns()

    def task_failed(self, alloc: Alloc, task: str) -> None:
        for runner in self.runners.get(alloc.id, []):
            if runner.name != task:
                self.spawn(runner.kill())   # Nomad kills the siblings of a failed task

    def stop_alloc(self, alloc: Alloc, grace_cap: float | None = None) -> asyncio.Task[Any]:
        alloc.desired = "stop"
        self.services.deregister_alloc(alloc)   # Nomad deregisters before it kills
        self.alloc_changed(alloc)
        return self.spawn(self._kill_all(alloc, grace_cap))

    async def _kill_all(self, alloc: Alloc, grace_cap: float | None) -> None:
        runners = self.runners.get(alloc.id, [])
        await asyncio.gather(*(r.kill(grace_cap=grace_cap) for r in runners))
        for runner in runners:   # a task that never started is dead now too
            if runner.ts["State"] != "dead":
                runner.ts["State"] = "dead"
        self.alloc_changed(alloc)

    def node_lost(self) -> list[str]:
        lost = []
        for alloc in self.state.live_allocs():
            alloc.client_status = "lost"
            alloc.client_description = "alloc is lost since its node is down"
            for runner in self.runners.get(alloc.id, []):
                self.spawn(runner.kill(hard=True))
            self.alloc_changed(alloc)
            lost.append(alloc.id)
        return lost

    async def variables_changed(self, path: str) -> None:
        for alloc in self.state.live_allocs():
            for runner in self.runners.get(alloc.id, []):
                self.spawn(runner.variables_changed({path}))

    async def shutdown(self) -> None:
        """Stop every task (SIGTERM, SIGKILL after 2s) and wait for everything."""
        for alloc in self.state.live_allocs():
            self.stop_alloc(alloc, grace_cap=2.0)
        for runners in self.runners.values():
            for runner in runners:
                self.spawn(runner.kill(grace_cap=2.0))
        deadline = time.monotonic() + 5
        while self.background and time.monotonic() < deadline:
            await asyncio.wait(set(self.background), timeout=0.5)
        for runners in self.runners.values():
            for runner in runners:
                runner.send(signal.SIGKILL)
        await self.services.close()


def _metric(dimension: dict[str, int] | None = None,
            constraint: dict[str, int] | None = None) -> dict[str, Any]:
    return {"NodesEvaluated": 1, "NodesFiltered": 1 if constraint else 0, "NodesInPool": 1,
            "NodePool": "default", "NodesAvailable": {"dc1": 1}, "ClassFiltered": None,
            "ConstraintFiltered": constraint, "NodesExhausted": 1 if dimension else 0,
            "ClassExhausted": None, "DimensionExhausted": dimension, "QuotaExhausted": None,
            "ResourcesExhausted": None, "Scores": None, "AllocationTime": 1000,
            "CoalescedFailures": 0, "ScoreMetaData": None}


def _bindable(port: int) -> bool:
    # Only a listener makes a port unusable: without SO_REUSEADDR the TIME_WAIT left by a
    # stopped engine's connections would too, for a minute (and real Nomad does not probe).
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

