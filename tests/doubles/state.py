"""The double's cluster state: one raft-like index, the Nomad tables, the Consul catalog, and
the test-facing records (rejections, request counts, faults).

Everything runs on one asyncio loop, so plain dicts need no locks; waiting for "index > N"
(blocking queries) is an asyncio.Condition notified on every bump.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NODE_ID = "5e0a1c3e-d0b1-4e5a-9f00-000000000001"  # the first node; fixed: tests may assert on it
NODE_NAME = "double-node-1"
DATACENTER = "dc1"
REGION = "global"
TERMINAL = ("complete", "failed", "lost")
MKDIR_VERSION = "0.0.1"  # client/hostvolumemanager: HostVolumePluginMkdirVersion
NODE_CPU = 4000          # MHz, a 4-core client
NODE_MEMORY_MB = 8192


def node_id(number: int) -> str:
    """IDs sort in node order, so "first feasible node in node-ID order" is node 1, 2, ..."""
    return f"5e0a1c3e-d0b1-4e5a-9f00-{number:012d}"


def new_id() -> str:
    return str(uuid.uuid4())


def now_ns() -> int:
    return time.time_ns()


def rfc3339(ns: int | None = None) -> str:
    ns = now_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


@dataclass
class Faults:
    nomad_down: bool = False
    consul_down: bool = False
    ports_exhausted: bool = False
    memory_exhausted: bool = False
    task_crash: bool = False
    slow_health_s: float = 0.0
    template_delay_s: float = 0.0
    # How long a new host volume stays "pending", fixed; unset (None), the client's node
    # update timing decides it (volumes.py; client/client.go watchNodeUpdates, retryIntv).
    fingerprint_s: float | None = None
    # Evaluations wait this long in the broker before a worker takes them (0: at once), so
    # tests can make evals of one job queue up and be canceled (nomad/eval_broker.go).
    eval_delay_s: float = 0.0
    # The event stream (events.py): the heartbeat interval (Nomad: 30 s,
    # nomad/event_endpoint.go), and a count of frames to lose before they reach the buffer.
    event_heartbeat_s: float = 30.0
    lose_events: float = 0.0
    # Tasks of these names, started from now, exit 1 at once with a line on stderr saying
    # so (task_crash is the main tasks only: the engine, not its lifecycle tasks).
    fail_tasks: list[str] = field(default_factory=list)
    # How long a template's refused variable read (403) is retried before its task fails;
    # unset (None), the client's default nomad_retry schedule (task_templates.py).
    nomad_retry_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()}


@dataclass
class Node:
    """A client node (nomad/structs Node, the fields the double uses). `status` is Nomad's
    NodeStatus ("ready", "down"); a down node runs nothing and answers no client RPC."""
    id: str
    name: str
    datacenter: str = DATACENTER
    pool: str = "default"
    status: str = "ready"
    eligibility: str = "eligible"
    create_index: int = 1
    modify_index: int = 1
    # NodeResources, what allocations are counted against (scheduler/rank.go
    # BinPackIterator, structs ComparableResources.Superset: cpu, then memory)
    cpu: int = NODE_CPU
    memory_mb: int = NODE_MEMORY_MB
    node_class: str = ""
    drain: bool = False   # a DrainStrategy is set (the stub's Drain is exactly that)
    # Volumes the server deleted with force=true while the node was down: the client never
    # heard of it, keeps them in its state, restores them when it comes back
    # (client/hostvolumemanager restoreFromState) and fingerprints them; the server has no
    # record of them. Volume ID -> the volume as it was.
    orphans: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.eligibility == "eligible"


@dataclass
class Alloc:
    """An allocation; `doc` is its API shape minus AllocatedResources/TaskStates, which are
    derived when serving."""
    id: str
    job_id: str
    eval_id: str
    group: str
    job: dict[str, Any]          # the job as registered (a snapshot: later registers differ)
    ports: dict[str, int]        # label -> host port
    volumes: dict[str, dict[str, Any]]  # group volume name -> HostVolume
    dir: Path
    desired: str = "run"
    client_status: str = "pending"
    client_description: str = ""
    task_states: dict[str, dict[str, Any]] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)  # task -> pid while it runs
    node_id: str = NODE_ID
    create_index: int = 0
    modify_index: int = 0
    create_time: int = field(default_factory=now_ns)
    modify_time: int = field(default_factory=now_ns)

    @property
    def terminal(self) -> bool:
        return self.client_status in TERMINAL


@dataclass
class ConsulService:
    id: str
    name: str
    tags: list[str]
    meta: dict[str, str]
    port: int
    alloc_id: str
    checks: dict[str, dict[str, Any]]  # CheckID -> HealthCheck
    create_index: int
    modify_index: int


class State:
    def __init__(self, data_dir: Path, port_range: tuple[int, int], nodes: int = 1,
                 timing: str = "production", cpu: int = NODE_CPU,
                 memory_mb: int = NODE_MEMORY_MB):
        self.data_dir = data_dir
        # "production": a client's node updates 5-10 s apart and Consul's staggered first
        # check; "dev": a `-dev` agent's 1 s updates, checks at once (see README.md, Timing)
        self.timing = timing
        self.port_range = port_range
        self.index = 1
        self.consul_index = 1  # Consul's own counter: bumps only when the catalog changes
        # Consul's X-Consul-Index of /v1/health/service/<name> is that service's own index
        # (agent/consul/state/catalog.go maxIndexForService), not the catalog's.
        self.service_index: dict[str, int] = {}
        self.nodes: dict[str, Node] = {
            node_id(i): Node(node_id(i), f"double-node-{i}", cpu=cpu, memory_mb=memory_mb)
            for i in range(1, nodes + 1)}
        self._changed = asyncio.Condition()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        self.allocs: dict[str, Alloc] = {}
        self.volumes: dict[str, dict[str, Any]] = {}
        self.variables: dict[str, dict[str, Any]] = {}
        self.services: dict[str, ConsulService] = {}
        self.faults = Faults()
        self.rejections: list[dict[str, Any]] = []
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (api, method, route)
        from tests.doubles.events import EventBroker  # it types against State
        self.broker = EventBroker(self)

    # ---- the index and blocking queries --------------------------------------------------

    def bump(self) -> int:
        """A write happened: advance the index and wake every blocking query."""
        self.index += 1
        asyncio.get_running_loop().create_task(self._notify())
        return self.index

    def bump_consul(self, service: str | None = None) -> int:
        self.index += 1
        self.consul_index = self.index
        if service is not None:
            self.service_index[service] = self.index
        asyncio.get_running_loop().create_task(self._notify())
        return self.consul_index

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_past(self, index: int, seconds: float, consul: bool = False,
                        service: str | None = None) -> None:
        """Return when the (Nomad, Consul, or one Consul service's) index exceeds `index`,
        or after `seconds`."""
        def past() -> bool:
            if service is not None:
                return self.service_index.get(service, 1) > index
            return (self.consul_index if consul else self.index) > index
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(past), timeout=seconds)
        except TimeoutError:
            pass

    # ---- look-ups ------------------------------------------------------------------------

    def job_allocs(self, job_id: str) -> list[Alloc]:
        return sorted((a for a in self.allocs.values() if a.job_id == job_id),
                      key=lambda a: a.create_index)

    def live_allocs(self) -> list[Alloc]:
        return [a for a in self.allocs.values() if not a.terminal]

    def volumes_named(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        return [v for v in self.volumes.values()
                if v["Name"] == name and v["Namespace"] == namespace]

    def node_allocs(self, node: str) -> list[Alloc]:
        return [a for a in self.live_allocs() if a.node_id == node]

    def reject(self, method: str, path: str, errors: list[str]) -> None:
        self.rejections.append({"method": method, "path": path, "errors": errors})

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "jobs": {jid: {"Status": j["Status"], "Stop": j["Stop"], "Version": j["Version"]}
                     for jid, j in self.jobs.items()},
            "allocs": [{"id": a.id, "job": a.job_id, "client_status": a.client_status,
                        "desired_status": a.desired, "ports": a.ports, "node": a.node_id,
                        "pids": dict(a.pids)}
                       for a in self.allocs.values()],
            "nodes": {n.id: n.status for n in self.nodes.values()},
            "node_resources": {n.id: {"cpu": n.cpu, "memory_mb": n.memory_mb, "drain": n.drain,
                                      "node_class": n.node_class}
                               for n in self.nodes.values()},
            "volumes": [{"id": v["ID"], "name": v["Name"], "host_path": v["HostPath"],
                         "node": v["NodeID"], "state": v["State"]}
                        for v in self.volumes.values()],
            "variables": sorted(self.variables),
            "services": [{"id": s.id, "name": s.name, "port": s.port,
                          "checks": {c["Name"]: c["Status"] for c in s.checks.values()}}
                         for s in self.services.values()],
            "faults": self.faults.as_dict(),
        }
