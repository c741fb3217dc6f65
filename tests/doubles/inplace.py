"""In-place updates: a new version of a job whose running allocation can keep running.

Follows, at v1.10.5, scheduler/util.go tasksUpdated (what makes an update destructive: a
task's driver, config, env, templates, resources, volumes, networks and its combined job,
group and task Meta, which reach the task as NOMAD_META_*) and inplaceUpdate (otherwise the
allocation takes the new job where it runs), and client/allocrunner's group service hook
(the services' tags and meta are updated in Consul; their checks keep their status).

What this double compares is narrower and on the safe side: a job differing from the
allocation's in nothing but its services' Tags and Meta is updated in place; any other
difference is destructive.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.doubles import templates
from tests.doubles.state import Alloc, State

IN_PLACE = ("Tags", "Meta")  # service fields an update may change without a restart


def _without_service_labels(job: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(job)
    for group in stripped.get("TaskGroups") or []:
        for owner in [group, *(group.get("Tasks") or [])]:
            for service in owner.get("Services") or []:
                for field in IN_PLACE:
                    service.pop(field, None)
    return stripped


def in_place(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether `new` may replace `old` under a running allocation (both as submitted)."""
    return _without_service_labels(old) == _without_service_labels(new)


def update(state: State, alloc: Alloc, job: dict[str, Any]) -> None:
    """Give the allocation the new job, and its Consul services their new tags and meta."""
    alloc.job = job
    alloc.modify_index = state.bump()
    for group in job.get("TaskGroups") or []:
        if group.get("Name") != alloc.group:
            continue
        for owner in [group, *(group.get("Tasks") or [])]:
            task = owner if "Driver" in owner else (group.get("Tasks") or [{}])[0]
            for service in owner.get("Services") or []:
                _relabel(state, alloc, service, task)


def _relabel(state: State, alloc: Alloc, service: dict[str, Any], task: dict[str, Any]) -> None:
    env = templates.task_env(alloc, task, {"alloc": "", "local": "", "secrets": ""})
    meta = {k[len("NOMAD_META_"):]: v for k, v in env.items() if k.startswith("NOMAD_META_")}
    name = templates.interpolate(service.get("Name") or "", env, meta)
    label = service.get("PortLabel") or ""
    for registered in state.services.values():
        if registered.alloc_id == alloc.id and registered.name == name \
                and registered.id.endswith(f"-{name}-{label}"):
            registered.tags = [templates.interpolate(t, env, meta) for t in service.get("Tags") or []]
            registered.meta = {k: templates.interpolate(v, env, meta)
                               for k, v in (service.get("Meta") or {}).items()}
            registered.modify_index = state.bump_consul(name)
