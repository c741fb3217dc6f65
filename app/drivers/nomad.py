"""The Nomad driver: one Nomad job per engine, its brain on a dynamic host volume, its key in a
Nomad Variable, its readiness from Consul.

An engine's resources all carry its name (app.naming): the job ID, the Consul service, the host
volume's name and the variable `nomad/jobs/<name>`. The driver's state on the row holds the
volume's ID, node and host path, the current allocation and the URL. Restarts belong to the
orchestrator (the job templates set Nomad's restart and reschedule attempts to 0), so a crash
is seen here and counted once, with the orchestrator's backoff. An allocation lost with its
node is `node_lost`: Nomad would replace it once the node (and the brain on it) is back, but
the orchestrator decides, so the engine is failed and restarted by the reconciler.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from app import engine_http, jobspec
from app.config import ConfigError, Settings
from app.discovery import Discovery
from app.drivers import _nomad_claim, _nomad_snapshots
from app.drivers._nomad_api import NomadAPI, NomadError, SchedulerRejected, VariableConflict
from app.drivers._nomad_events import FleetEvents
from app.drivers._nomad_probe import Prober
from app.drivers._nomad_volumes import Volumes
from app.drivers.base import (
    BootTimeout,
    CapacityExhausted,
    Driver,
    DriverError,
    EngineCrashed,
    EngineSpec,
    NodeLost,
    PortExhaustion,
    Probe,
    SchedulerUnavailable,
    State,
)

log = logging.getLogger("orch.nomad")
T = TypeVar("T")

TASK = "engine"  # the task name in jobspecs/*.json
TERMINAL = ("complete", "failed", "lost")
PORTS_EXHAUSTED = "network: dynamic port selection failed"
PLACEMENT_WAIT_S = 30.0
STOP_MARGIN_S = 15.0  # beyond the kill timeout: the client reporting the allocation's end
VALIDATE_TIMEOUT_S = 3.0
_OUR_NAME = re.compile(r"e-[a-z0-9-]+-[0-9a-f]{12}")


class NomadDriver(Driver):
    name = "nomad"

    def __init__(self, settings: Settings):
        try:
            jobspec.check(settings)
        except ConfigError as exc:
            problem = settings.kill_timeout_problem()
            raise ConfigError(problem or f"ORCH_NOMAD_JOBSPEC={str(settings.nomad_jobspec)!r} "
                                         f"is invalid: {exc}") from None
        self.settings = settings
        self.api = NomadAPI(settings)
        self.volumes = Volumes(self.api, settings)
        self.consul = Discovery(settings)
        _validate_with_nomad(settings)
        # Blocking queries hold a thread each: a pool of our own, so they never starve others.
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="nomad")
        self.http = engine_http.client()
        # Nomad's event stream and Consul's blocking queries report engines' ends,
        # and answer the scheduled health checks while they are live.
        self.events = FleetEvents(settings, lambda: self._io(self.api.all_allocations))
        # A fleet snapshot at most once per reconciler pass, when the events cannot answer.
        self.prober = Prober(self.api, self.consul, self.events, self._io,
                             snapshot_ttl=min(0.5, settings.tick_s / 2))
        self.events.subscribe(self.prober.stale)   # first: the listeners' probes must read anew
        self.brains = _nomad_snapshots.Brains(settings, self.api, self.volumes, self._io, self.http)
        self._followed = False

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- Driver interface ----------------------------------------------------------------

    def check_version(self, version: str) -> None:
        jobspec.check_version(self.settings, version)

    async def create(self, spec: EngineSpec, api_key: str) -> State:
        full: frozenset[str] = frozenset()   # nodes that refused the job for capacity
        last: CapacityExhausted | None = None
        while True:
            state: State = {"job": spec.name}
            new = False
            try:
                job = jobspec.render_job(self.settings, spec)
                volume, new = await self._io(self.volumes.create, spec.name, job, full)
                state.update(volume=volume["ID"], node=volume.get("NodeID"))
                volume = await self.brains.ready(volume)
                state["volume_path"] = volume.get("HostPath")
                return await self.launch(spec, state, api_key)
            except CapacityExhausted as exc:
                await self._quietly(self.destroy(spec, state))
                # The volume pinned the job to a node that is full after all (it filled up
                # since we looked, or holds what we cannot see): a new, empty volume moves
                # to another node. Volumes.create raises once no node is left.
                if full and not new:   # no node left to move to: say why the last refused
                    raise CapacityExhausted(f"{last} (and no other node fits: {exc})") from None
                if not new or isinstance(exc, (NodeLost, PortExhaustion)) or not state.get("node"):
                    raise
                full, last = full | {state["node"]}, exc
                log.info("%s: node %s is full, moving its new volume: %s",
                         spec.name, state["node"], exc)
            except BaseException:
                await self._quietly(self.destroy(spec, state))
                raise

    async def launch(self, spec: EngineSpec, state: State, api_key: str) -> State:
        await self._io(self.api.put_variable, jobspec.var_path(spec.name), {"api_key": api_key})
        await self.brains.prepare(spec, state)
        job = self.brains.job(spec, state)
        eval_id = await self._register(job)
        try:
            alloc = await self._placed(spec, eval_id)
        except DriverError as exc:
            # Unplaced, the job would wait in a blocked evaluation and start behind our back
            # once capacity frees up: take it back.
            await self._quietly(self._io(self.api.deregister, spec.name, False))
            if isinstance(exc, CapacityExhausted):
                await self._raise_if_node_down(spec, state)
            raise
        return {**_without(state, "url"), "job": spec.name, "alloc": alloc}

    async def wait_ready(self, spec: EngineSpec, state: State, timeout: float) -> tuple[State, str]:
        deadline = time.monotonic() + timeout
        index = 0
        while True:
            alloc = await self._io(self.api.allocation, state.get("alloc") or "")
            if alloc is None or alloc.get("ClientStatus") in TERMINAL:
                status = alloc.get("ClientStatus") if alloc else "gone"
                raise EngineCrashed(f"engine {spec.name}: allocation {status} while booting", state)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootTimeout(f"engine {spec.name} was not healthy within {timeout:g}s", state)
            index, found = await self._io(self.consul.watch, spec.name, index, min(remaining, 1.0))
            if found and found.status == "passing":
                self._watch(spec, state, resync=False)   # running now: its end is news
                if state.get(_nomad_snapshots.RESTORING):
                    state = await self.brains.finish(spec, state)
                return {**state, "url": found.url}, found.url
            # A resumed engine keeps its URL: its own /health answers before Consul's next check.
            if state.get("url") and await engine_http.healthy(self.http, state["url"], timeout=0.5):
                self._watch(spec, state, resync=False)
                return state, state["url"]

    async def stop(self, spec: EngineSpec, state: State, grace: float) -> State:
        self.events.forget(spec.name)   # an end we cause is no news
        # Nomad kills with the job's KillTimeout (ORCH_STOP_GRACE_S, rendered into the job):
        # `grace` cannot shorten it, so the wait covers that.
        await self._thaw(state)
        if await self._io(self.api.job, spec.name) is not None:
            await self._io(self.api.deregister, spec.name, False)
        await self._until_stopped(spec.name, self.settings.stop_grace_s + STOP_MARGIN_S)
        return _without(state, "alloc", "url")

    async def _thaw(self, state: State) -> None:
        # Nomad sends only the KillSignal, then SIGKILL after the KillTimeout: a paused
        # (SIGSTOPped) engine would never see its SIGTERM and would lose its clean exit.
        if state.get("alloc"):
            try:
                await self._io(self.api.signal, state["alloc"], TASK, "SIGCONT")
            except DriverError as exc:   # not running (any more): nothing to thaw
                log.debug("SIGCONT before stopping %s: %s", state["alloc"], exc)

    async def pause(self, spec: EngineSpec, state: State) -> None:
        if state.get("alloc"):
            await self._io(self.api.signal, state["alloc"], TASK, "SIGSTOP")

    async def resume(self, spec: EngineSpec, state: State) -> bool:
        alloc = await self._io(self.api.allocation, state["alloc"]) if state.get("alloc") else None
        if alloc is None or alloc.get("ClientStatus") != "running":
            return False
        return await self._io(self.api.signal, state["alloc"], TASK, "SIGCONT")

    async def set_key(self, spec: EngineSpec, state: State, api_key: str) -> None:
        """Write the Variable with check-and-set; Nomad re-renders the task's key file from it
        and sends SIGHUP (the template's change_mode). The caller confirms with the engine."""
        path = jobspec.var_path(spec.name)
        for _ in range(5):
            current = await self._io(self.api.variable, path)
            cas = int(current["ModifyIndex"]) if current else 0
            try:
                await self._io(self.api.put_variable, path, {"api_key": api_key}, cas)
                return
            except VariableConflict:
                continue  # written meanwhile (a crashed rotation's roll-back): read again
        raise SchedulerUnavailable(f"variable {path} kept changing under us")

    async def claimed(self, spec: EngineSpec, state: State) -> None:
        await self._register(_nomad_claim.claimed_job(self.settings, spec, state))

    async def destroy(self, spec: EngineSpec, state: State | None) -> None:
        state = state or {}
        self.events.forget(spec.name)
        if await self._io(self.api.job, spec.name) is not None:
            await self._thaw(state)
            await self._io(self.api.deregister, spec.name, False)
            await self._until_stopped(spec.name, self.settings.stop_grace_s + STOP_MARGIN_S)
            await self._io(self.api.deregister, spec.name, True)
        for volume_id in await self.brains.volume_ids(spec.name, state):
            await self._delete_volume(volume_id)
        await self.brains.delete_variables(spec.name)
        await self._io(self.api.delete_variable, jobspec.var_path(spec.name))

    async def probe(self, spec: EngineSpec, state: State) -> Probe:
        """From what the event follower knows, else a fleet snapshot (app/drivers/_nomad_probe.py)."""
        alloc_id = state.get("alloc")
        return await self.prober.probe(spec.name, alloc_id) if alloc_id else "dead"

    async def list_names(self) -> set[str]:
        jobs = await self._io(self.api.jobs, "e-")
        names = {j["ID"] for j in jobs if (j.get("Meta") or {}).get("managed_by") == "orch"}
        names |= {_nomad_snapshots.engine_of(v.get("Name") or "") or ""
                  for v in await self._io(self.api.volumes)}
        prefix = jobspec.var_path("")
        # nomad/jobs/<name> and the sidecar's nomad/jobs/<name>/<group>/<task>
        names |= {v["Path"][len(prefix):].split("/")[0]
                  for v in await self._io(self.api.variables, prefix + "e-")}
        return {n for n in names if _OUR_NAME.fullmatch(n)}

    # ---- brains copied where they live (app/drivers/_nomad_snapshots.py) ------------------

    def remote_snapshots(self) -> bool:
        return self.brains.enabled

    async def brain_available(self, spec: EngineSpec, state: State) -> bool:
        return await self.brains.available(state)

    async def stranded(self, states: Mapping[str, State]) -> set[str]:
        return await self.brains.stranded(states) if states else set()

    async def brain_fingerprint(self, spec: EngineSpec, state: State) -> str:
        return await self.brains.fingerprint(spec, state)

    async def copy_brain(self, spec: EngineSpec, state: State) -> dict[str, Any]:
        return await self.brains.copy(spec, state)

    async def restore_brain(self, spec: EngineSpec, state: State, source: str, snapshot_id: str,
                            *, elsewhere: bool = False,
                            save: Callable[[State], None] | None = None) -> State:
        return await self.brains.restore(spec, state, source, snapshot_id, elsewhere, save)

    async def tidy(self, spec: EngineSpec, state: State) -> State:
        return await self.brains.tidy(spec, state)

    def on_exit(self, listener: Callable[[str], None]) -> bool:
        self.events.subscribe(listener)
        self._followed = self.settings.nomad_events   # someone listens: follow (a CLI does not)
        return self._followed

    def watch(self, spec: EngineSpec, state: State) -> None:
        self._watch(spec, state, resync=True)

    def _watch(self, spec: EngineSpec, state: State, resync: bool) -> None:
        if self._followed and state.get("alloc"):
            self.events.watch(spec.name, state["alloc"], state.get("node"), resync)

    async def ping(self) -> None:
        await self._io(self.api.leader)
        await self._io(self.consul.ping)

    async def close(self) -> None:
        await self.events.close()
        await self.http.aclose()
        self.api.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- helpers ---------------------------------------------------------------------------

    async def _placed(self, spec: EngineSpec, eval_id: str) -> str:
        """Follow the evaluation to an allocation, or to the reason there is none."""
        deadline = time.monotonic() + PLACEMENT_WAIT_S
        while True:
            evaluation = await self._io(self.api.evaluation, eval_id)
            if evaluation.get("Status") == "canceled":
                # The broker cancels an eval superseded by a newer one of the same job
                # (nomad/eval_broker.go): that one does the work. Follow it.
                newer = await self._newer_eval(spec.name, evaluation)
                if newer:
                    eval_id = newer
                    continue
            _raise_placement_failure(spec, evaluation)
            if evaluation.get("Status") in ("failed", "canceled"):
                raise CapacityExhausted(f"Nomad could not place {spec.name}: "
                                        f"{evaluation.get('StatusDescription') or evaluation['Status']}")
            if evaluation.get("Status") == "complete":
                allocs = [a for a in await self._io(self.api.allocations, spec.name)
                          if a.get("DesiredStatus") == "run"]
                # What this eval placed counts even if it has already ended (an engine that
                # crashed at once, on a loaded host, before we looked): wait_ready reports it
                # as crashed. Otherwise (an in-place update) the live allocation is the engine.
                ours = [a for a in allocs if a.get("EvalID") == eval_id]
                live = ours or [a for a in allocs if a.get("ClientStatus") not in TERMINAL]
                if live:
                    return str(max(live, key=lambda a: a.get("CreateIndex", 0))["ID"])
            if time.monotonic() > deadline:
                raise CapacityExhausted(f"Nomad did not place {spec.name} within {PLACEMENT_WAIT_S:g}s")
            await asyncio.sleep(0.05)

    async def _raise_if_node_down(self, spec: EngineSpec, state: State) -> None:
        """A placement that failed because the brain's node is down is node_lost."""
        node_id = state.get("node")
        if not node_id and state.get("volume"):
            volume = await self._io(self.api.volume, state["volume"])
            node_id = (volume or {}).get("NodeID")
        status = await self._io(self.api.node_status, node_id) if node_id else None
        if status not in (None, "ready"):
            raise NodeLost(f"the brain of {spec.name} is on node {node_id}, which is "
                           f"{status}: unavailable until the node returns", state)

    async def _newer_eval(self, job_id: str, evaluation: dict[str, Any]) -> str | None:
        evals = [e for e in await self._io(self.api.evaluations, job_id)
                 if e.get("CreateIndex", 0) > evaluation.get("CreateIndex", 0)
                 and e.get("Status") != "canceled" and e.get("TriggeredBy") != "queued-allocs"]
        return max(evals, key=lambda e: e.get("CreateIndex", 0))["ID"] if evals else None

    async def _register(self, job: dict[str, Any]) -> str:
        try:
            return await self._io(self.api.register, job)
        except NomadError as exc:
            # Nomad answers its job validation's refusal as an uncoded error, a 500
            # (nomad/job_endpoint.go Register): ask its validator whether that is what this
            # is, so a broken job is reported as ours, not as "Nomad is down".
            problems = await self._io(self.api.validate, job) if exc.http_status == 500 else []
            if problems:
                raise SchedulerRejected(f"Nomad refused job {job['ID']}: {'; '.join(problems)}") \
                    from None
            raise

    async def _until_stopped(self, job_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(a.get("ClientStatus") not in TERMINAL
                  for a in await self._io(self.api.allocations, job_id)):
            if time.monotonic() > deadline:
                raise SchedulerUnavailable(f"the allocations of {job_id} did not stop within {timeout:g}s")
            await asyncio.sleep(0.05)

    async def _delete_volume(self, volume_id: str) -> None:
        # The client may hold its claim a moment after the allocation ended.
        deadline = time.monotonic() + STOP_MARGIN_S
        while True:
            outcome = await self._io(self.volumes.delete, volume_id)
            if outcome in ("deleted", "gone"):
                return
            if outcome == "node down":
                # Not with force=true: Nomad would only forget it, and the node would bring it
                # back, the user's data in it (the client restores its volumes from its own
                # state). The destroy is finished once the node is back (the row stays
                # `destroying`, and recovery runs it again).
                raise SchedulerUnavailable(f"host volume {volume_id} is on a node that is down: "
                                           f"it is deleted when the node returns")
            if time.monotonic() > deadline:
                raise SchedulerUnavailable(f"host volume {volume_id} is still in use")
            await asyncio.sleep(0.1)

    async def _quietly(self, work: Any) -> None:
        try:
            await work
        except DriverError as exc:
            log.warning("clean-up left for the reconciler: %s", exc)


def _validate_with_nomad(settings: Settings) -> None:
    """The job template through Nomad's own validator (PUT /v1/validate/job), when Nomad
    answers at start-up: a template Nomad would refuse stops start-up, not every provision."""
    api = NomadAPI(settings, timeout=VALIDATE_TIMEOUT_S)
    try:
        spec = EngineSpec("e-validate-000000000000", "validate", "validate", settings.engine_image)
        problems = api.validate(jobspec.render_job(settings, spec))
    except DriverError as exc:
        log.warning("job template not validated by Nomad at start-up: %s", exc)
        return
    finally:
        api.close()
    if problems:
        raise ConfigError(f"ORCH_NOMAD_JOBSPEC={str(settings.nomad_jobspec)!r} is refused by "
                          f"Nomad: {'; '.join(problems)}")


def _raise_placement_failure(spec: EngineSpec, evaluation: dict[str, Any]) -> None:
    # A placement failure is no HTTP error: the evaluation records it per task group.
    for metric in (evaluation.get("FailedTGAllocs") or {}).values():
        exhausted = metric.get("DimensionExhausted") or {}
        if PORTS_EXHAUSTED in exhausted:
            raise PortExhaustion(f"Nomad has no free dynamic port for {spec.name}")
        why = ", ".join(sorted({**exhausted, **(metric.get("ConstraintFiltered") or {})})) or "no node fits"
        raise CapacityExhausted(f"Nomad could not place {spec.name}: {why}")


def _without(state: State, *keys: str) -> State:
    return {k: v for k, v in state.items() if k not in keys}
