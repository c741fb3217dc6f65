"""An engine's brain on Nomad: its dynamic host volume, placed on a node the driver chooses,
created and deleted idempotently against the answers Nomad really gives.

Nomad itself, given no NodeID, takes the first feasible node in node-ID order
(nomad/host_volume_endpoint.go placeHostVolume), ready or not: every engine would land on one
node, and nothing could be provisioned while that node is down. So the driver chooses: a node
that is ready, eligible and not draining, in one of the job's datacenters and its node pool,
that has the `mkdir` plugin (attribute plugins.host_volume.mkdir.version), with room for the
job (its NodeResources, less its reserved resources and what its running allocations hold,
covers the job's CPU and memory: the scheduler's BinPackIterator would place it), holding the
fewest engine volumes. The volume then pins the job to that node (scheduler/feasible.go
HostVolumeChecker), so a node that still turns out full is avoided on the next try (see
nomad.py create). Create looks the name up first (a retried provision finds its volume);
delete treats "no such volume" (a 500, like every refusal of HostVolume.Delete) as done.
"""

from __future__ import annotations

import fnmatch
import re
import time
from typing import Any

from app.config import Settings
from app.drivers._nomad_api import NomadAPI, NomadError
from app.drivers.base import CapacityExhausted

ENGINE_VOLUME = re.compile(r"e-[a-z0-9-]+-[0-9a-f]{12}(?:-r[0-9]+)?")  # any generation
MKDIR_ATTRIBUTE = "plugins.host_volume.mkdir.version"
NODE_CACHE_S = 60.0  # a node's plugins change only when its agent restarts
TERMINAL = ("complete", "failed", "lost")


def job_needs(job: dict[str, Any]) -> tuple[int, int]:
    """(CPU MHz, memory MB) the job's tasks ask for; api/resources.go's defaults (100, 300)
    where unset."""
    cpu = memory = 0
    for group in job.get("TaskGroups") or []:
        for task in group.get("Tasks") or []:
            res = task.get("Resources") or {}
            cpu += int(res.get("CPU") or 100) * int(group.get("Count") or 1)
            memory += int(res.get("MemoryMB") or 300) * int(group.get("Count") or 1)
    return cpu, memory


def _room(node: dict[str, Any], held: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(CPU, memory) the node has left: NodeResources less ReservedResources less `held`."""
    total = node.get("NodeResources") or {}
    reserved = node.get("ReservedResources") or {}
    used = held.get(node["ID"], (0, 0))
    cpu = int((total.get("Cpu") or {}).get("CpuShares") or 0) \
        - int((reserved.get("Cpu") or {}).get("CpuShares") or 0) - used[0]
    memory = int((total.get("Memory") or {}).get("MemoryMB") or 0) \
        - int((reserved.get("Memory") or {}).get("MemoryMB") or 0) - used[1]
    return cpu, memory


class VolumeGone(Exception):
    """The volume does not exist (any more)."""


class Volumes:
    def __init__(self, api: NomadAPI, settings: Settings):
        self.api = api
        self.parameters = {"uid": str(settings.nomad_volume_uid),
                           "gid": str(settings.nomad_volume_gid),
                           "mode": settings.nomad_volume_mode}
        self._has_mkdir: dict[str, tuple[float, bool]] = {}

    def find(self, name: str) -> list[dict[str, Any]]:
        return [v for v in self.api.volumes(prefix=name) if v.get("Name") == name]

    def create(self, name: str, job: dict[str, Any],
               avoid: frozenset[str] = frozenset()) -> tuple[dict[str, Any], bool]:
        """The engine's volume and whether it is new: the one it already has on a live node,
        else a new one on the best node not in `avoid`. Raises CapacityExhausted when no node
        fits."""
        nodes = {n["ID"]: n for n in self.api.nodes()}
        for volume in self.find(name):
            node = nodes.get(volume.get("NodeID") or "")
            if node is not None and node.get("Status") == "ready":
                # a list stub carries no HostPath (nomad/structs HostVolumeStub): read it whole
                return self.get(str(volume["ID"])), False
            raise CapacityExhausted(f"the brain of {name} is on node {volume.get('NodeID')}, "
                                    f"which is down: unavailable until the node returns")
        return self._new(name, job, list(nodes.values()), set(avoid), None), True

    def create_on(self, name: str, job: dict[str, Any], avoid: frozenset[str],
                  prefer: str | None) -> dict[str, Any]:
        """A new volume `name` (a restore's new brain): on `prefer` when it fits there, else
        on the best node not in `avoid`. One of that name already on a usable node (a
        restore cut short made it) is taken as it is."""
        nodes = {n["ID"]: n for n in self.api.nodes()}
        for volume in self.find(name):
            node = nodes.get(volume.get("NodeID") or "")
            if node is not None and node.get("Status") == "ready" and node["ID"] not in avoid:
                return self.get(str(volume["ID"]))
        return self._new(name, job, list(nodes.values()), set(avoid), prefer)

    def _new(self, name: str, job: dict[str, Any], nodes: list[dict[str, Any]], tried: set[str],
             prefer: str | None) -> dict[str, Any]:
        while True:
            node_id = self._choose(job, nodes, tried, prefer)
            try:
                return self.api.create_volume(name, node_id, self.parameters)
            except NomadError as exc:
                # The node went down since we listed it: the client RPC fails. Another one.
                if "No path to node" not in exc.text and "no node" not in exc.text.lower():
                    raise
                tried.add(node_id)

    def _choose(self, job: dict[str, Any], nodes: list[dict[str, Any]], tried: set[str],
                prefer: str | None = None) -> str:
        pool = job.get("NodePool") or "default"
        datacenters = job.get("Datacenters") or ["*"]
        fit = [n for n in nodes
               if n["ID"] not in tried and n.get("Status") == "ready"
               and n.get("SchedulingEligibility") == "eligible" and not n.get("Drain")
               and (n.get("NodePool") or "default") == pool
               and any(fnmatch.fnmatchcase(n.get("Datacenter") or "", d) for d in datacenters)
               and self._mkdir(n["ID"])]
        if not fit:
            raise CapacityExhausted(f"no ready, eligible node with the mkdir host volume plugin "
                                    f"in node pool {pool!r} and datacenters {datacenters}")
        need_cpu, need_memory = job_needs(job)
        free = self._free()
        roomy = [n for n in fit if _room(n, free)[0] >= need_cpu and _room(n, free)[1] >= need_memory]
        if not roomy:
            raise CapacityExhausted(f"no node has room for {need_cpu} MHz of CPU and "
                                    f"{need_memory} MB of memory ({len(fit)} nodes full)")
        fit = roomy
        if any(n["ID"] == prefer for n in fit):
            return str(prefer)
        load: dict[str, int] = {}
        for volume in self.api.volumes():
            if ENGINE_VOLUME.fullmatch(volume.get("Name") or ""):
                load[volume.get("NodeID") or ""] = load.get(volume.get("NodeID") or "", 0) + 1
        return str(min(fit, key=lambda n: (load.get(n["ID"], 0), n["ID"]))["ID"])

    def _free(self) -> dict[str, tuple[int, int]]:
        """node ID -> (CPU, memory) its live allocations hold."""
        held: dict[str, tuple[int, int]] = {}
        for alloc in self.api.allocations_with_resources():
            if alloc.get("DesiredStatus") != "run" or alloc.get("ClientStatus") in TERMINAL:
                continue
            cpu = memory = 0
            for task in ((alloc.get("AllocatedResources") or {}).get("Tasks") or {}).values():
                cpu += int((task.get("Cpu") or {}).get("CpuShares") or 0)
                memory += int((task.get("Memory") or {}).get("MemoryMB") or 0)
            was = held.get(alloc.get("NodeID") or "", (0, 0))
            held[alloc.get("NodeID") or ""] = (was[0] + cpu, was[1] + memory)
        return held

    def _mkdir(self, node_id: str) -> bool:
        cached = self._has_mkdir.get(node_id)
        if cached and time.monotonic() - cached[0] < NODE_CACHE_S:
            return cached[1]
        node = self.api.node(node_id) or {}
        has = bool((node.get("Attributes") or {}).get(MKDIR_ATTRIBUTE))
        self._has_mkdir[node_id] = (time.monotonic(), has)
        return has

    def get(self, volume_id: str) -> dict[str, Any]:
        volume = self.api.volume(volume_id)
        if volume is None:
            raise VolumeGone(volume_id)
        return volume

    def delete(self, volume_id: str) -> str:
        """Delete; "deleted", "gone" (there was none), "in use" or "node down"."""
        try:
            self.api.delete_volume(volume_id)
            return "deleted"
        except NomadError as exc:
            if exc.text.startswith("no such volume"):
                return "gone"
            if "in use by allocations" in exc.text:
                return "in use"
            if "without force=true" in exc.text:
                return "node down"
            raise

