"""API shapes of the double's state: Job, JobListStub, Allocation, AllocationListStub,
TaskState. Kept apart from the handlers so each reads as "what Nomad answers"."""

from __future__ import annotations

from typing import Any

from tests.doubles.lifecycle import lifecycles
from tests.doubles.state import MKDIR_VERSION, Alloc, Node, State

ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time, as Nomad writes an unset time


def job_view(job: dict[str, Any], status: str) -> dict[str, Any]:
    out = {k: v for k, v in job.items() if not k.startswith("_")}
    out["Status"] = status
    return out


def job_stub(job: dict[str, Any], status: str, meta: bool) -> dict[str, Any]:
    """structs.JobListStub: `Meta` only when the list asked for it with ?meta=true
    (command/agent/job_endpoint.go jobListRequest -> JobStubFields.Meta)."""
    stub = {"ID": job["ID"], "ParentID": "", "Name": job["Name"], "Namespace": job["Namespace"],
            "Datacenters": job["Datacenters"], "NodePool": job["NodePool"],
            "Multiregion": None, "Type": job["Type"], "Priority": job["Priority"],
            "Periodic": False, "ParameterizedJob": False, "Stop": job["Stop"],
            "Status": status, "StatusDescription": "", "JobSummary": None,
            "CreateIndex": job["CreateIndex"], "ModifyIndex": job["ModifyIndex"],
            "JobModifyIndex": job["JobModifyIndex"], "SubmitTime": job["SubmitTime"]}
    if meta:
        stub["Meta"] = job.get("Meta")
    return stub


def task_states(alloc: Alloc) -> dict[str, Any]:
    out = {}
    for name, ts in alloc.task_states.items():
        out[name] = {"State": ts["State"], "Failed": ts["Failed"], "Restarts": ts["Restarts"],
                     "LastRestart": ts["LastRestart"] or ZERO_TIME,
                     "StartedAt": ts["StartedAt"] or ZERO_TIME,
                     "FinishedAt": ts["FinishedAt"] or ZERO_TIME,
                     "Events": [dict(e) for e in ts["Events"]]}
    return out


def alloc_stub(alloc: Alloc, state: State, with_resources: bool = False) -> dict[str, Any]:
    """AllocationListStub: AllocatedResources only with ?resources=true
    (command/agent/alloc_endpoint.go AllocsRequest, structs AllocStubFields)."""
    out = _stub(alloc, state)
    if with_resources:
        out["AllocatedResources"] = resources(alloc)
    return out


def _stub(alloc: Alloc, state: State) -> dict[str, Any]:
    return {"ID": alloc.id, "EvalID": alloc.eval_id, "Name": f"{alloc.job_id}.{alloc.group}[0]",
            "Namespace": alloc.job.get("Namespace", "default"), "NodeID": alloc.node_id,
            "NodeName": state.nodes[alloc.node_id].name, "JobID": alloc.job_id,
            "JobType": alloc.job.get("Type"),
            "JobVersion": alloc.job.get("Version", 0), "TaskGroup": alloc.group,
            "DesiredStatus": alloc.desired, "DesiredDescription": _desired_description(alloc),
            "ClientStatus": alloc.client_status, "ClientDescription": alloc.client_description,
            "TaskStates": task_states(alloc), "DeploymentStatus": None, "FollowupEvalID": "",
            "NextAllocation": "", "RescheduleTracker": None, "PreemptedAllocations": None,
            "PreemptedByAllocation": "", "CreateIndex": alloc.create_index,
            "ModifyIndex": alloc.modify_index, "CreateTime": alloc.create_time,
            "ModifyTime": alloc.modify_time}


def _desired_description(alloc: Alloc) -> str:
    return "alloc is being stopped" if alloc.desired == "stop" else ""


def allocation(alloc: Alloc, state: State) -> dict[str, Any]:
    out = alloc_stub(alloc, state)
    out.pop("JobType")
    out.pop("JobVersion")
    out.update({"Job": job_view(alloc.job, "running"), "AllocatedResources": resources(alloc),
                "DeploymentID": "", "AllocModifyIndex": alloc.modify_index, "Metrics": None,
                "PreviousAllocation": "", "Services": None})
    return out


def resources(alloc: Alloc) -> dict[str, Any]:
    group = next(g for g in alloc.job["TaskGroups"] if g["Name"] == alloc.group)
    ports, dynamic, reserved = [], [], []
    for net in group.get("Networks") or []:
        for kind, out in (("DynamicPorts", dynamic), ("ReservedPorts", reserved)):
            for port in net.get(kind) or []:
                value = alloc.ports[port["Label"]]
                to = port.get("To") or 0
                ports.append({"Label": port["Label"], "Value": value, "To": to,
                              "HostIP": "127.0.0.1"})
                out.append({"Label": port["Label"], "Value": value, "To": to,
                            "HostNetwork": port.get("HostNetwork") or "default"})
    networks = [{"Mode": "host", "Device": "", "CIDR": "", "IP": "127.0.0.1", "MBits": 0,
                 "DNS": None, "DynamicPorts": dynamic or None, "ReservedPorts": reserved or None}]
    tasks = {}
    for task in group["Tasks"]:
        res = task.get("Resources") or {}
        tasks[task["Name"]] = {"Cpu": {"CpuShares": res.get("CPU") or 100},
                               "Memory": {"MemoryMB": res.get("MemoryMB") or 300,
                                          "MemoryMaxMB": res.get("MemoryMaxMB") or 0},
                               "Networks": None, "Devices": None}
    return {"Tasks": tasks, "TaskLifecycles": lifecycles(group),
            "Shared": {"Ports": ports or None, "Networks": networks if ports else None,
                       "DiskMB": 300}}


def volume_stub(vol: dict[str, Any]) -> dict[str, Any]:
    keys = ("Namespace", "ID", "Name", "PluginID", "NodePool", "NodeID", "CapacityBytes",
            "State", "CreateIndex", "CreateTime", "ModifyIndex", "ModifyTime")
    return {k: vol[k] for k in keys}


def variable_meta(var: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in var.items() if k != "Items"}


def node_stub(node: Node, volumes: list[dict[str, Any]],
              resources: bool = False) -> dict[str, Any]:
    """structs.NodeListStub (nomad/structs/structs.go Node.Stub): no Attributes unless
    ?os=true, and then only os.name/os.version; Drain is "a DrainStrategy is set";
    HostVolumes as the node has them; NodeResources and ReservedResources only with
    ?resources=true."""
    return {"Address": "127.0.0.1", "ID": node.id, "Attributes": None,
            "Datacenter": node.datacenter, "Name": node.name, "NodeClass": node.node_class,
            "NodePool": node.pool, "Version": "1.10.5", "Drain": node.drain,
            "SchedulingEligibility": node.eligibility, "Status": node.status,
            "StatusDescription": "", "Drivers": _drivers(),
            "HostVolumes": _host_volumes(volumes + (list(node.orphans.values())
                                                    if node.status == "ready" else [])),
            "NodeResources": node_resources(node) if resources else None,
            "ReservedResources": _reserved() if resources else None, "LastDrain": None,
            "CreateIndex": node.create_index, "ModifyIndex": node.modify_index}


def _host_volumes(volumes: list[dict[str, Any]]) -> dict[str, Any] | None:
    # structs.ClientHostVolumeConfig per name: the node's ready (fingerprinted) volumes
    return {v["Name"]: {"Name": v["Name"], "Path": v["HostPath"], "ReadOnly": False,
                        "ID": v["ID"]}
            for v in volumes if v["State"] == "ready"} or None


def node_resources(node: Node) -> dict[str, Any]:
    """structs.NodeResources, the parts the scheduler counts against."""
    return {"Cpu": {"CpuShares": node.cpu, "TotalCpuCores": max(1, node.cpu // 1000),
                    "ReservableCpuCores": None},
            "Memory": {"MemoryMB": node.memory_mb}, "Disk": {"DiskMB": 100_000},
            "Networks": None, "NodeNetworks": None, "Devices": None,
            "MinDynamicPort": 20000, "MaxDynamicPort": 32000}


def _reserved() -> dict[str, Any]:
    return {"Cpu": {"CpuShares": 0}, "Memory": {"MemoryMB": 0}, "Disk": {"DiskMB": 0},
            "Networks": {"ReservedHostPorts": ""}}


def node_view(node: Node, volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """structs.Node: Attributes carry the fingerprinted host volume plugins
    (plugins.host_volume.<id>.version, what placeHostVolume's constraint reads) and
    HostVolumes the node's ready volumes by name."""
    out = node_stub(node, volumes, resources=True)
    out.pop("Address")
    out.update({"HTTPAddr": "127.0.0.1:4646", "TLSEnabled": False,
                "Attributes": {"nomad.version": "1.10.5", "kernel.name": "linux",
                               "driver.docker": "1", "driver.raw_exec": "1",
                               "plugins.host_volume.mkdir.version": MKDIR_VERSION,
                               "unique.hostname": node.name},
                "Meta": {}, "Events": None, "HostNetworks": None})
    return out


def _drivers() -> dict[str, Any]:
    return {name: {"Detected": True, "Healthy": True, "HealthDescription": "Healthy",
                   "Attributes": None, "UpdateTime": "0001-01-01T00:00:00Z"}
            for name in ("docker", "raw_exec")}
