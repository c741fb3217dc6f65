"""Naming a warm pool engine's user on Nomad, once it is claimed, without restarting it.

Nomad restarts an allocation whose job changed in its tasks' driver, config, env, templates
or combined Meta (job, group and task Meta reach the task as NOMAD_META_*), and updates it in
place when only its services changed (scheduler/util.go tasksUpdated, inplaceUpdate). So the
claimed job is the job the engine runs, with its services' Meta `user_id` and a
`user-<user id>` tag added: Consul shows whose engine it is within an evaluation, and the
engine keeps running. The job's own Meta and ENGINE_USER_ID name the user from the engine's
next start, when the job is rendered for its user.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from app import jobspec
from app.config import Settings
from app.drivers.base import EngineSpec, State


def claimed_job(settings: Settings, spec: EngineSpec, state: State) -> dict[str, Any]:
    pooled = dataclasses.replace(spec, user_id="")  # as the engine was started
    job = jobspec.render_job(settings, pooled, volume_path=state.get("volume_path"),
                             volume_name=state.get("volume_name"))
    user = jobspec.literal(spec.user_id)
    for group in job.get("TaskGroups") or []:
        for owner in [group, *(group.get("Tasks") or [])]:
            for service in owner.get("Services") or []:
                service["Meta"] = {**(service.get("Meta") or {}), "user_id": user}
                service["Tags"] = [*(service.get("Tags") or []), f"user-{user}"]
    return job
