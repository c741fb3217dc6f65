"""The double's cluster of N nodes: job registration, evaluations (and their broker),
placement (placement.py), allocation runners, stops, node loss and return, shutdown.

Follows, at v1.10.5: nomad/job_endpoint.go Register/Deregister (an eval per change),
nomad/eval_broker.go (one eval per job in flight; evals arriving meanwhile wait, and when the
in-flight one is acked the newest waiting one runs and the older ones are canceled, "canceled
after more recent eval was processed", nomad/leader.go reapCancelableEvaluations),
scheduler/reconcile.go (allocations on a down node are marked lost, "alloc is lost since its
node is down", and replaced whatever the reschedule policy), nomad/blocked_evals.go (a
placement failure leaves a blocked eval, unblocked when a node comes back, a volume turns
ready or an allocation finishes, nomad/fsm.go).

An evaluation is processed by a worker after the register call has answered (its reply's eval
is `pending`), `eval_delay_s` later; a replacement allocation waits for the allocation it
replaces to stop.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from typing import Any

from tests.doubles import inplace, jobcheck, lifecycle, placement, views
from tests.doubles.checks import ServiceManager
from tests.doubles.state import Alloc, State, new_id, now_ns
from tests.doubles.tasks import TaskRunner

SERVER_FIELDS = ("Status", "StatusDescription", "Stable", "Version", "SubmitTime",
                 "CreateIndex", "ModifyIndex", "JobModifyIndex", "Stop")
CANCELED = "canceled after more recent eval was processed"
LOST = "alloc is lost since its node is down"


class Cluster:
    def __init__(self, state: State):
        self.state = state
        self.services = ServiceManager(state)
        self.runners: dict[str, list[TaskRunner]] = {}
        self.coordinators: dict[str, lifecycle.Coordinator] = {}
        self.acl: Any = None   # the Nomad API's ACL (acl.py), for workload identity reads
        self.killing: set[str] = set()   # allocs whose tasks handleTaskStateUpdates kills
        self.background: set[asyncio.Task[Any]] = set()
        self.inflight: set[str] = set()                        # job IDs with an eval running
        self.waiting: dict[str, list[dict[str, Any]]] = {}     # job ID -> evals queued behind
        self.blocked: dict[str, dict[str, Any]] = {}           # job ID -> its blocked eval

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
        self._job_event(stored, "JobRegistered")
        ev = self._new_eval(stored, "job-register")
        self.blocked.pop(jid, None)   # a new version supersedes the blocked eval's work
        self.enqueue(jid, ev)
        return {"EvalID": ev["ID"], "EvalCreateIndex": ev["CreateIndex"],
                "JobModifyIndex": stored["JobModifyIndex"], "Warnings": "",
                "Index": self.state.index, "LastContact": 0, "KnownLeader": True}

    def _needs_placement(self, job: dict[str, Any]) -> bool:
        # The version its last alloc ran is a no-op while that alloc lives, and after it
        # failed (Nomad does not replace a failed alloc whose reschedule policy is spent). A
        # new version, or a lost or completed alloc, is placed.
        allocs = self.state.job_allocs(job["ID"])
        if job["Stop"]:
            return False
        # A new version (a changed job, or one registered again after a stop) is placed
        # afresh: allocations of older versions no longer count (scheduler/reconcile.go).
        if not allocs or allocs[-1].job["Version"] != job["Version"]:
            return True
        if any(not a.terminal and a.desired == "run" for a in allocs):
            return False
        return allocs[-1].client_status != "failed"

    # ---- the eval broker -------------------------------------------------------------------

    def enqueue(self, jid: str, ev: dict[str, Any]) -> None:
        if jid in self.inflight:
            self.waiting.setdefault(jid, []).append(ev)
            return
        # nomad/job_endpoint.go Register only commits the eval; scheduler workers dequeue
        # it from the broker later, so the reply's eval is always still `pending`.
        self.inflight.add(jid)
        self.spawn(self._work(jid, ev))

    async def _work(self, jid: str, ev: dict[str, Any] | None) -> None:
        try:
            while ev is not None:
                await asyncio.sleep(self.state.faults.eval_delay_s)
                self._process(ev)
                queued = sorted(self.waiting.pop(jid, []), key=lambda e: e["CreateIndex"])
                for older in queued[:-1]:
                    older.update({"Status": "canceled", "StatusDescription": CANCELED,
                                  "ModifyIndex": self.state.bump(), "ModifyTime": now_ns()})
                ev = queued[-1] if queued else None
        finally:
            self.inflight.discard(jid)

    def _process(self, ev: dict[str, Any]) -> None:
        job = self.state.jobs.get(ev["JobID"])
        if job is not None and self._updated_in_place(job):
            self._finish_eval(ev, {})
        elif job is not None and self._needs_placement(job):
            self._evaluate(job, ev)
        else:
            self._finish_eval(ev, {})   # nothing to change: a no-op plan

    def _updated_in_place(self, job: dict[str, Any]) -> bool:
        live = [a for a in self.state.job_allocs(job["ID"]) if not a.terminal and a.desired == "run"]
        if job["Stop"] or len(live) != 1 or live[0].job["Version"] == job["Version"] \
                or not inplace.in_place(live[0].job["_submitted"], job["_submitted"]):
            return False
        inplace.update(self.state, live[0], job)
        self.alloc_event(live[0], "AllocationUpdated")
        return True

    def deregister(self, jid: str, purge: bool) -> dict[str, Any]:
        job = self.state.jobs.get(jid)
        if job is None:
            return {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0,
                    "Index": self.state.index, "LastContact": 0, "KnownLeader": True}
        index = self.state.bump()
        job.update({"Stop": True, "ModifyIndex": index, "JobModifyIndex": index})
        self._job_event(job, "JobDeregistered")
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

    def _job_event(self, job: dict[str, Any], kind: str) -> None:
        # nomad/state/events.go eventFromChange, table "jobs": keyed by the job ID
        self.state.broker.publish("Job", kind, job["ID"],
                                  {"Job": views.job_view(job, self.job_status(job))},
                                  namespace=job.get("Namespace", "default"))

    def alloc_event(self, alloc: Alloc, kind: str) -> None:
        # table "allocs": keyed by the alloc ID, the job ID a filter key, the Job left out
        payload = views.allocation(alloc, self.state)
        payload["Job"] = None
        self.state.broker.publish("Allocation", kind, alloc.id, {"Allocation": payload},
                                  namespace=payload["Namespace"], filter_keys=[alloc.job_id, ""])

    def _node_event(self, node_id: str) -> None:
        # table "nodes", NodeUpdateStatusRequestType -> TypeNodeEvent ("NodeStreamEvent")
        node = self.state.nodes[node_id]
        volumes = [v for v in self.state.volumes.values() if v["NodeID"] == node_id]
        self.state.broker.publish("Node", "NodeStreamEvent", node_id,
                                  {"Node": views.node_view(node, volumes)})

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
            self.blocked[job["ID"]] = blocked
        self._finish_eval(ev, failed)

    def _place(self, job: dict[str, Any], group: dict[str, Any], ev: dict[str, Any],
               previous: list[Alloc]) -> dict[str, Any] | None:
        """Place one alloc of `group`; the AllocationMetric of the failure, or None."""
        nodes, failure = placement.feasible_nodes(self.state, job, group)
        if failure:
            return failure
        ports = placement.pick_ports(self.state, group)
        if ports is None:
            return placement.metric(self.state, len(self.state.nodes), len(nodes),
                                    dimension={placement.PORT_FAIL: len(nodes)})
        # scheduler/stack.go: shuffled nodes, the best of a couple by score; the double
        # takes the least loaded of the feasible ones (ties at random)
        node = min(random.sample(nodes, len(nodes)),
                   key=lambda n: len(self.state.node_allocs(n.id)))
        index = self.state.bump()
        alloc = Alloc(id=new_id(), job_id=job["ID"], eval_id=ev["ID"], group=group["Name"],
                      job=job, ports=ports, volumes=placement.volumes_on(self.state, node, group),
                      dir=self.state.data_dir / "allocs", node_id=node.id,
                      create_index=index, modify_index=index)
        alloc.dir = alloc.dir / alloc.id
        self.state.allocs[alloc.id] = alloc
        self.alloc_event(alloc, "PlanResult")   # ApplyPlanResultsRequestType
        ev["NodeID"] = node.id
        coordinator = self.coordinators[alloc.id] = lifecycle.Coordinator(group["Tasks"])
        self.runners[alloc.id] = [TaskRunner(self, alloc, t, group, coordinator)
                                  for t in group["Tasks"]]
        self.spawn(self._run_alloc(alloc, previous))
        return None

    # ---- allocations ---------------------------------------------------------------------

    async def _run_alloc(self, alloc: Alloc, previous: list[Alloc]) -> None:
        while any(not p.terminal for p in previous):
            await asyncio.sleep(0.05)   # Nomad's client waits for the replaced alloc
        if alloc.desired != "run":
            return
        self.task_state_changed(alloc)   # the coordinator leaves "init": the first gates open
        await asyncio.gather(*(r.run() for r in self.runners.get(alloc.id, [])))

    def alloc_changed(self, alloc: Alloc, kind: str = "AllocationUpdated") -> None:
        """A task state changed: derive the alloc's ClientStatus as Nomad's client does."""
        was_live = not alloc.terminal
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
        self.alloc_event(alloc, kind)   # the client's update (AllocClientUpdateRequestType)
        if was_live and alloc.client_status in ("complete", "failed"):
            # nomad/fsm.go applyAllocClientUpdate: an alloc the client finished frees its
            # node's capacity, so the blocked evals run again (UnblockClassAndQuota).
            self.unblock()

    def task_state_changed(self, alloc: Alloc) -> None:
        """alloc_runner.go handleTaskStateUpdates: kill the live tasks when a task failed,
        the leader died or only sidecars are left (lifecycle.kill_reason), then let the
        lifecycle coordinator open the next gates."""
        runners = self.runners.get(alloc.id, [])
        reason = lifecycle.kill_reason(runners)
        if reason is not None and alloc.id not in self.killing:
            self.killing.add(alloc.id)
            for runner in runners:
                if runner.ts["State"] != "dead" and runner.stage != lifecycle.POSTSTOP:
                    runner.event(reason["Type"], reason["DisplayMessage"],
                                 **{k: v for k, v in reason.items()
                                    if k not in ("Type", "DisplayMessage")})
            self.spawn(self._kill_all(alloc, None))
        coordinator = self.coordinators.get(alloc.id)
        if coordinator is not None:
            coordinator.update(alloc.task_states)

    def stop_alloc(self, alloc: Alloc, grace_cap: float | None = None) -> asyncio.Task[Any]:
        alloc.desired = "stop"
        self.services.deregister_alloc(alloc)   # Nomad deregisters before it kills
        self.alloc_changed(alloc, "PlanResult")   # the plan sets DesiredStatus stop
        return self.spawn(self._kill_all(alloc, grace_cap))

    async def _kill_all(self, alloc: Alloc, grace_cap: float | None) -> None:
        runners = self.runners.get(alloc.id, [])
        await lifecycle.kill_in_order(runners, grace_cap)
        for runner in runners:   # a task that never started is dead now too
            if runner.ts["State"] != "dead" and runner.stage != lifecycle.POSTSTOP:
                runner.ts["State"] = "dead"
        self.alloc_changed(alloc)
        self.task_state_changed(alloc)   # every other task dead: the poststop gate opens

    def node_lost(self, node_id: str) -> list[str]:
        """The node stops heartbeating: it goes down, its volumes unavailable
        (state_store_host_volumes.go), its allocations lost and replaced (reconcile.go)."""
        node = self.state.nodes[node_id]
        node.status, node.modify_index = "down", self.state.bump()
        self._node_event(node_id)
        for vol in self.state.volumes.values():
            if vol["NodeID"] == node_id and vol["State"] == "ready":
                vol["State"], vol["ModifyIndex"] = "unavailable", self.state.bump()
        lost = []
        for alloc in self.state.node_allocs(node_id):
            alloc.client_status, alloc.client_description = "lost", LOST
            alloc.desired = "stop"
            for runner in self.runners.get(alloc.id, []):
                self.spawn(runner.kill(hard=True))
            self.alloc_changed(alloc, "PlanResult")   # the node-update plan marks it lost
            lost.append(alloc)
        for jid in sorted({a.job_id for a in lost}):
            job = self.state.jobs.get(jid)
            if job is not None and not job["Stop"]:
                self.enqueue(jid, self._new_eval(job, "node-update"))
        return [a.id for a in lost]

    def node_up(self, node_id: str) -> None:
        node = self.state.nodes[node_id]
        node.status, node.modify_index = "ready", self.state.bump()
        self._node_event(node_id)
        for vol in self.state.volumes.values():
            if vol["NodeID"] == node_id and vol["State"] != "ready":
                vol["State"], vol["ModifyIndex"] = "ready", self.state.bump()
        self.unblock()

    def unblock(self) -> None:
        """Capacity changed: blocked evals run again (blocked_evals.go Unblock)."""
        for jid, blocked in list(self.blocked.items()):
            job = self.state.jobs.get(jid)
            del self.blocked[jid]
            if job is None or job["Stop"]:
                self._finish_eval(blocked, {})
                continue
            blocked["Status"] = "pending"
            self.enqueue(jid, blocked)

    async def variables_changed(self, path: str) -> None:
        # Only the tasks whose templates read this variable hear of it: consul-template
        # watches each template's dependencies (client/allocrunner/taskrunner/template
        # template.go hands it the templates; its watcher follows what each one reads), not
        # every variable. A task per runner for each write made 1,000 engines' provisioning
        # quadratic (the fleet bench).
        for alloc in self.state.live_allocs():
            for runner in self.runners.get(alloc.id, []):
                if path in runner.reads:
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


