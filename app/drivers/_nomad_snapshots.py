"""Snapshots of brains on Nomad, copied where they live: by the `snapshot` task of the engine's
own task group (Lifecycle poststart, a sidecar mounting the brain volume: app.snapshots.sidecar),
and restored by a `restore` task derived from it (Lifecycle prestart) that fills a NEW volume
before the engine starts.

The sidecar's configuration, store credentials included, is a Nomad Variable at
`nomad/jobs/<job>/<group>/snapshot`, which Nomad lets only that task read (the engine task
cannot); app/drivers/_nomad_sidecar.py writes it and calls the sidecar. A restore's is
`.../restore`, kept while the engine's state says `restoring`.

A volume made by a restore is `<engine name>-r<N>`, N counting up, and the job's `Source` names
it: no job asks for an older generation again, so a node that comes back after its engine was
restored elsewhere never mounts its stale brain. The old volume is listed under LEFTOVERS until
it is deleted.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from app import errors, jobspec
from app.config import Settings
from app.drivers._nomad_api import NomadAPI
from app.drivers._nomad_sidecar import ANSWER_MARGIN_S, CALL_TIMEOUT_S, COPY_TIMEOUT_S, Sidecars
from app.drivers._nomad_volumes import VolumeGone, Volumes
from app.drivers.base import (
    LEFTOVERS,
    CapacityExhausted,
    DriverError,
    EngineSpec,
    State,
)

log = logging.getLogger("orch.nomad")
IO = Callable[..., Awaitable[Any]]

RESTORING = "restoring"  # state key: {"source", "snapshot"} until the restored engine is ready
GENERATION = "generation"
VOLUME_NAME = "volume_name"
_VOLUME = re.compile(r"(e-[a-z0-9-]+-[0-9a-f]{12})(?:-r([0-9]+))?")
VOLUME_WAIT_S = 30.0
SNAPSHOTS_OFF = "the job template has no `snapshot` task: snapshots on Nomad are off"


def volume_name(name: str, generation: int) -> str:
    """The name of generation `generation` of the engine's brain volume (0: the first)."""
    return name if generation <= 0 else f"{name}-r{generation}"


def engine_of(volume: str) -> str | None:
    """The engine a volume of any generation belongs to; None when it is not ours."""
    found = _VOLUME.fullmatch(volume)
    return found.group(1) if found else None


def generation_of(volume: str) -> int:
    found = _VOLUME.fullmatch(volume)
    return int(found.group(2) or 0) if found else 0


def var_paths(settings: Settings, name: str) -> list[str]:
    """The variables of the sidecar and of a restore, when the template has the sidecar."""
    group = jobspec.sidecar_group(settings)
    if group is None:
        return []
    return [jobspec.task_var_path(name, group, task)
            for task in (jobspec.SNAPSHOT_TASK, jobspec.RESTORE_TASK)]


def with_restore_task(job: dict[str, Any], restore_var: str, snapshot_var: str) -> dict[str, Any]:
    """The job with a `restore` task before the others: the `snapshot` task, as a prestart
    task that runs once to completion in restore mode, reading the restore variable, with no
    port. Nomad starts the group's main tasks only once it has exited 0."""
    job = copy.deepcopy(job)
    for group in job.get("TaskGroups") or []:
        tasks = group.get("Tasks") or []
        sidecar = next((t for t in tasks if t.get("Name") == jobspec.SNAPSHOT_TASK), None)
        if sidecar is None:
            continue
        task = copy.deepcopy(sidecar)
        task["Name"] = jobspec.RESTORE_TASK
        task["Lifecycle"] = {"Hook": "prestart", "Sidecar": False}
        env = {k: v for k, v in (task.get("Env") or {}).items()
               if k not in ("ORCH_SIDECAR_HOST", "ORCH_SIDECAR_PORT")}
        task["Env"] = {**env, "ORCH_SIDECAR_MODE": "restore"}
        config = task.get("Config") or {}
        config.pop("ports", None)
        for template in task.get("Templates") or []:
            template["EmbeddedTmpl"] = str(template.get("EmbeddedTmpl") or "").replace(
                f'"{snapshot_var}"', f'"{restore_var}"')
        group["Tasks"] = [task, *tasks]
        return job
    raise errors.invalid(SNAPSHOTS_OFF)


def restored(state: State) -> State:
    """The state once the restored engine is ready: no restore left to run."""
    return {k: v for k, v in state.items() if k != RESTORING}


def leftover(state: State) -> dict[str, Any]:
    return {"volume": state.get("volume"), "node": state.get("node"),
            "name": state.get(VOLUME_NAME) or ""}


def with_leftover(state: State, entry: dict[str, Any]) -> list[dict[str, Any]]:
    known = [e for e in state.get(LEFTOVERS) or [] if e.get("volume") != entry.get("volume")]
    return [*known, entry] if entry.get("volume") else known


class Brains:
    """The driver's snapshot calls (app/drivers/base.py), against Nomad and the sidecars."""

    def __init__(self, settings: Settings, api: NomadAPI, volumes: Volumes, io: IO,
                 http: httpx.AsyncClient):
        self.settings, self.api, self.volumes, self.io = settings, api, volumes, io
        self.group = jobspec.sidecar_group(settings)
        self.sidecars = Sidecars(settings, api, io, http, self._var)

    @property
    def enabled(self) -> bool:
        return self.group is not None

    def _var(self, name: str, task: str) -> str:
        return jobspec.task_var_path(name, self.group or "", task)

    def job(self, spec: EngineSpec, state: State) -> dict[str, Any]:
        """The engine's job on its current brain volume, with the restore task while a
        restore is due."""
        job = jobspec.render_job(self.settings, spec, volume_path=state.get("volume_path"),
                                 volume_name=state.get(VOLUME_NAME))
        if state.get(RESTORING):
            job = with_restore_task(job, self._var(spec.name, jobspec.RESTORE_TASK),
                                    self._var(spec.name, jobspec.SNAPSHOT_TASK))
        return job

    async def prepare(self, spec: EngineSpec, state: State) -> None:
        """Before a launch: the sidecar's variable, and the restore's while one is due."""
        if self.enabled:
            await self.sidecars.prepare(spec.name, state.get(RESTORING))

    async def fingerprint(self, spec: EngineSpec, state: State) -> str:
        answer = await self.call(spec, state, "GET", "/v1/fingerprint", CALL_TIMEOUT_S)
        return str(answer["fingerprint"])

    async def copy(self, spec: EngineSpec, state: State) -> dict[str, Any]:
        return await self.call(spec, state, "POST", "/v1/snapshot",
                               COPY_TIMEOUT_S + ANSWER_MARGIN_S)

    async def call(self, spec: EngineSpec, state: State, method: str, path: str,
                   timeout: float) -> dict[str, Any]:
        alloc = await self.io(self.api.allocation, state["alloc"]) if state.get("alloc") else None
        return await self.sidecars.call(spec, alloc, method, path, timeout)

    async def restore(self, spec: EngineSpec, state: State, source: str, snapshot_id: str,
                      elsewhere: bool, save: Callable[[State], None] | None) -> State:
        if not self.enabled:
            raise errors.invalid(SNAPSHOTS_OFF)
        job = jobspec.render_job(self.settings, spec)
        old_node = state.get("node")
        avoid = frozenset([old_node]) if elsewhere and old_node else frozenset()
        generation = await self._next_generation(spec.name, state)
        name = volume_name(spec.name, generation)
        if save is not None:   # killed before the row learns the new volume: tidy finds it by name
            planned = {"name": name, "volume": None}
            save({**state, LEFTOVERS: [*(state.get(LEFTOVERS) or []), planned]})
        volume = await self.io(self.volumes.create_on, name, job, avoid,
                               None if elsewhere else old_node)
        volume = await self.ready(volume)
        leftovers = with_leftover(state, leftover(state))
        new: State = {k: v for k, v in state.items() if k not in ("alloc", "url", LEFTOVERS)}
        new.update({"job": spec.name, "volume": volume["ID"], "node": volume.get("NodeID"),
                    "volume_path": volume.get("HostPath"), VOLUME_NAME: name,
                    GENERATION: generation, RESTORING: {"source": source, "snapshot": snapshot_id}})
        return {**new, LEFTOVERS: leftovers} if leftovers else new

    async def ready(self, volume: dict[str, Any]) -> dict[str, Any]:
        # A new volume is `pending` until its node's next fingerprint reports it.
        deadline = time.monotonic() + VOLUME_WAIT_S
        while volume.get("State") != "ready":
            if volume.get("State") == "unavailable" or time.monotonic() > deadline:
                raise CapacityExhausted(f"host volume {volume.get('Name')} is {volume.get('State')}")
            await asyncio.sleep(0.05)
            try:
                volume = await self.io(self.volumes.get, volume["ID"])
            except VolumeGone:
                volume = {**volume, "State": "deleted"}
        return volume

    async def _next_generation(self, name: str, state: State) -> int:
        names = [v.get("Name") or "" for v in await self.io(self.api.volumes, name)]
        found = [generation_of(n) for n in names if engine_of(n) == name]
        if not found and not state.get("volume"):
            return 0   # a new engine's first brain (provision from a snapshot)
        return max([int(state.get(GENERATION) or 0), *found]) + 1

    async def finish(self, spec: EngineSpec, state: State) -> State:
        """The restored engine is ready: no restore task from now on, no restore variable,
        and the old brain deleted where its node allows."""
        state = restored(state)
        try:
            await self.io(self.api.delete_variable, self._var(spec.name, jobspec.RESTORE_TASK))
            return await self.tidy(spec, state)
        except DriverError as exc:   # the engine is up: what is left waits for tidy or destroy
            log.warning("after restoring %s: clean-up left for later: %s", spec.name, exc)
            return state

    async def stranded(self, states: Mapping[str, State]) -> set[str]:
        """The engines whose brain's node is down (one listing of the nodes)."""
        down = {n["ID"] for n in await self.io(self.api.nodes) if n.get("Status") == "down"}
        return {name for name, state in states.items() if state.get("node") in down}

    async def available(self, state: State) -> bool:
        """The brain's node is up, or no volume pins the engine to a node yet."""
        if not state.get("node"):
            return True
        status: str | None = await self.io(self.api.node_status, state["node"])
        return status == "ready"

    async def tidy(self, spec: EngineSpec, state: State) -> State:
        entries = state.get(LEFTOVERS)
        if not entries:
            return state
        kept = []
        for entry in entries:
            if not await self._remove(entry):
                kept.append(entry)
        tidied = {k: v for k, v in state.items() if k != LEFTOVERS}
        return {**tidied, LEFTOVERS: kept} if kept else tidied

    async def _remove(self, entry: dict[str, Any]) -> bool:
        """Delete one leftover volume; False while its node is down (or it is still held).
        An entry without a volume id names one a restore cut short may have created."""
        if not entry.get("volume"):
            found = [v for v in await self.io(self.volumes.find, entry["name"])
                     if v.get("Name") == entry["name"]]
            results = [await self._remove({"volume": v["ID"], "node": v.get("NodeID"),
                                           "name": entry["name"]}) for v in found]
            return all(results)
        status = await self.io(self.api.node_status, entry["node"]) if entry.get("node") else None
        if status not in (None, "ready"):
            return False
        outcome = await self.io(self.volumes.delete, entry["volume"])
        if outcome in ("deleted", "gone"):
            log.info("stale brain volume %s (%s) deleted", entry.get("name"), entry["volume"])
            return True
        return False

    async def volume_ids(self, name: str, state: State) -> list[str]:
        """Every generation of the engine's brain: the state's, its leftovers, and by name."""
        ids = [state["volume"]] if state.get("volume") else []
        ids += [e["volume"] for e in state.get(LEFTOVERS) or [] if e.get("volume")]
        ids += [v["ID"] for v in await self.io(self.api.volumes, name)
                if engine_of(v.get("Name") or "") == name]
        return list(dict.fromkeys(ids))

    async def delete_variables(self, name: str) -> None:
        for path in var_paths(self.settings, name):
            await self.io(self.api.delete_variable, path)
