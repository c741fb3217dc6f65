"""Where the double's scheduler puts an allocation: feasibility per node, then a port.

Follows scheduler/feasible.go and scheduler/stack.go at v1.10.5, for what the double models:
nodes must be ready and eligible, in one of the job's datacenters (`*` globs) and its node
pool; a host volume request is feasible only on the node holding a ready volume of that name
(HostVolumeChecker, dynamic host volumes); then each node's room: its CPU and memory less
what its live allocations hold, against the group's tasks' Resources (scheduler/rank.go
BinPackIterator; structs ComparableResources.Superset names the first short dimension, cpu
then memory; AllocMetric.ExhaustedNode counts it per dimension, and per node class when the
node has one); the `memory_exhausted` fault makes every node short of memory; then dynamic
ports (structs/network.go: picked at random from the range, the precise scan only when
random picks collide). Failures are reported in an AllocationMetric, as scheduler/context.go's
metrics do.
"""

from __future__ import annotations

import fnmatch
import random
import socket
from typing import Any

from tests.doubles.state import Node, State

PORT_FAIL = "network: dynamic port selection failed"
VOLUME_FAIL = "missing compatible host volumes"
RANDOM_TRIES = 20  # structs/network.go maxRandPortAttempts


def feasible_nodes(state: State, job: dict[str, Any], group: dict[str, Any],
                   ) -> tuple[list[Node], dict[str, Any] | None]:
    """The nodes a group can go on, or ([], the AllocationMetric of why none)."""
    pool = job.get("NodePool") or "default"
    dcs = job.get("Datacenters") or ["*"]
    in_pool = [n for n in state.nodes.values() if n.pool == pool]
    ready = [n for n in in_pool if n.ready and any(fnmatch.fnmatchcase(n.datacenter, d)
                                                   for d in dcs)]
    with_volumes = [n for n in ready if _has_volumes(state, n, group)]
    if not with_volumes:
        filtered = {VOLUME_FAIL: len(ready)} if ready else None
        return [], metric(state, len(in_pool), len(ready), constraint=filtered)
    fit: list[Node] = []
    dimension: dict[str, int] = {}
    classes: dict[str, int] = {}
    for node in with_volumes:
        short = "memory" if state.faults.memory_exhausted else short_of(state, node, group)
        if short is None:
            fit.append(node)
            continue
        dimension[short] = dimension.get(short, 0) + 1
        if node.node_class:
            classes[node.node_class] = classes.get(node.node_class, 0) + 1
    if not fit:
        return [], metric(state, len(in_pool), len(ready), dimension=dimension,
                          classes=classes or None)
    return fit, None


def group_needs(group: dict[str, Any]) -> tuple[int, int]:
    """(CPU MHz, memory MB) of a group: its tasks' Resources, api/resources.go defaults
    (CPU 100, MemoryMB 300) where unset."""
    cpu = memory = 0
    for task in group.get("Tasks") or []:
        res = task.get("Resources") or {}
        cpu += res.get("CPU") or 100
        memory += res.get("MemoryMB") or 300
    return cpu, memory


def used(state: State, node: Node) -> tuple[int, int]:
    """What the node's allocations meant to run hold (scheduler/context.go ProposedAllocs
    leaves out those the plan stops)."""
    cpu = memory = 0
    for alloc in state.node_allocs(node.id):
        if alloc.desired != "run":
            continue
        group = next(g for g in alloc.job["TaskGroups"] if g["Name"] == alloc.group)
        need = group_needs(group)
        cpu, memory = cpu + need[0], memory + need[1]
    return cpu, memory


def short_of(state: State, node: Node, group: dict[str, Any]) -> str | None:
    """The first dimension the node lacks for the group (Superset's order), or None."""
    cpu, memory = used(state, node)
    need_cpu, need_memory = group_needs(group)
    if cpu + need_cpu > node.cpu:
        return "cpu"
    if memory + need_memory > node.memory_mb:
        return "memory"
    return None


def _has_volumes(state: State, node: Node, group: dict[str, Any]) -> bool:
    for req in (group.get("Volumes") or {}).values():
        if req.get("Type") != "host":
            return False
        if not any(v["NodeID"] == node.id and v["State"] == "ready"
                   for v in state.volumes_named(req.get("Source") or "")):
            return False
    return True


def volumes_on(state: State, node: Node, group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for name, req in (group.get("Volumes") or {}).items():
        found[name] = next(v for v in state.volumes_named(req.get("Source") or "")
                           if v["NodeID"] == node.id)
    return found


def pick_ports(state: State, group: dict[str, Any]) -> dict[str, int] | None:
    """label -> host port, or None when a dynamic port cannot be found. Every node of the
    double shares one loopback, so ports are unique across the cluster, not per node."""
    held = {p for a in state.live_allocs() if a.desired == "run" for p in a.ports.values()}
    ports: dict[str, int] = {}
    for net in group.get("Networks") or []:
        for port in net.get("ReservedPorts") or []:
            ports[port["Label"]] = port["Value"]
            held.add(port["Value"])
        for port in net.get("DynamicPorts") or []:
            value = _free_port(state, held)
            if value is None:
                return None
            ports[port["Label"]] = value
            held.add(value)
    return ports


def _free_port(state: State, held: set[int]) -> int | None:
    if state.faults.ports_exhausted:
        return None
    low, high = state.port_range
    for _ in range(RANDOM_TRIES):
        port = random.randint(low, high)
        if port not in held and _bindable(port):
            return port
    free = [p for p in range(low, high + 1) if p not in held and _bindable(p)]
    return random.choice(free) if free else None


def metric(state: State, in_pool: int, evaluated: int,
           dimension: dict[str, int] | None = None,
           constraint: dict[str, int] | None = None,
           classes: dict[str, int] | None = None) -> dict[str, Any]:
    available: dict[str, int] = {}
    for node in state.nodes.values():
        if node.ready:
            available[node.datacenter] = available.get(node.datacenter, 0) + 1
    return {"NodesEvaluated": evaluated, "NodesFiltered": sum((constraint or {}).values()),
            "NodesInPool": in_pool, "NodePool": "default", "NodesAvailable": available,
            "ClassFiltered": None, "ConstraintFiltered": constraint,
            "NodesExhausted": sum((dimension or {}).values()), "ClassExhausted": classes,
            "DimensionExhausted": dimension, "QuotaExhausted": None,
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
