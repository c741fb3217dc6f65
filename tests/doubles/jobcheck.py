"""Nomad's own job validation (beyond JSON shapes) that the double enforces at register time,
and the defaults Nomad fills in (Namespace, Region, Priority, Count...).

Only rules real Nomad applies are here, so a job the double refuses would be refused (or
would fail) on a real cluster too. What the double cannot run (batch jobs, other drivers) is
refused with a message that says so.
"""

from __future__ import annotations

import copy
import re
from typing import Any

SECOND = 1_000_000_000
DEFAULT_PROGRESS_DEADLINE = 600 * SECOND   # api/jobs.go DefaultUpdateStrategy
RFC1123 = re.compile(r"^(?!-)[a-zA-Z0-9-]{1,63}(?<!-)$")
PLACEHOLDER = re.compile(r"\$\{[^}]*\}")
CHANGE_MODES = ("noop", "restart", "signal", "script")
RESTART_MODES = ("fail", "delay")


def check(job: dict[str, Any], url_id: str | None) -> list[str]:
    """Errors of a job about to be registered; [] when it is acceptable."""
    errors: list[str] = []
    jid = job.get("ID")
    if not jid:
        return ["Job ID is required"]
    if url_id is not None and jid != url_id:
        return ["Job ID does not match name"]
    if " " in jid or "\0" in jid:
        errors.append("Job ID contains a space or a null character")
    if (job.get("Type") or "service") != "service":
        errors.append(f"the double runs service jobs only, not {job.get('Type')!r}")
    groups = job.get("TaskGroups") or []
    if not groups:
        errors.append("Missing job task groups")
    for group in groups:
        _check_group(group, errors)
        _check_kill_timeout(job, group, errors)
    return errors


def go_duration(ns: int) -> str:
    """Go's time.Duration String() for the values validation messages print."""
    if ns == 0:
        return "0s"
    if ns < SECOND:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return f"{ns / size:g}{unit}"
    hours, rest = divmod(ns, 3600 * SECOND)
    minutes, rest = divmod(rest, 60 * SECOND)
    seconds = f"{rest / SECOND:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    return f"{minutes}m{seconds}" if minutes else seconds


def _check_check_timing(check: dict[str, Any], where: str, errors: list[str]) -> None:
    """nomad/structs/services.go ServiceCheck.validate: both are required, at least 1s."""
    interval, timeout = check.get("Interval") or 0, check.get("Timeout") or 0
    if interval == 0:
        errors.append(f"{where}: missing required value interval. Interval cannot be less "
                      f"than 1s")
    elif interval < SECOND:
        errors.append(f"{where}: interval ({go_duration(interval)}) cannot be lower than 1s")
    if timeout == 0:
        errors.append(f"{where}: missing required value timeout. Timeout cannot be less "
                      f"than 1s")
    elif timeout < SECOND:
        errors.append(f"{where}: timeout ({go_duration(timeout)}) is lower than required "
                      f"minimum timeout 1s")


def _check_kill_timeout(job: dict[str, Any], group: dict[str, Any], errors: list[str]) -> None:
    """nomad/structs/structs.go Task.Validate: a service task's KillTimeout may not exceed
    its group's update ProgressDeadline; api/jobs.go canonicalisation gives every service
    group an update block with ProgressDeadline 10m, and 0 turns the check off."""
    update = {**(job.get("Update") or {}), **(group.get("Update") or {})}
    deadline = update.get("ProgressDeadline")
    deadline = DEFAULT_PROGRESS_DEADLINE if deadline is None else deadline
    for task in group.get("Tasks") or []:
        kill = task.get("KillTimeout") or 0
        if deadline > 0 and kill > deadline:
            errors.append(f'Task group "{group.get("Name") or ""}", Task '
                          f'"{task.get("Name") or ""}": KillTimout ({go_duration(kill)}) longer '
                          f"than the group's ProgressDeadline ({go_duration(deadline)})")


def _check_group(group: dict[str, Any], errors: list[str]) -> None:
    gname = group.get("Name") or ""
    where = f'Task group "{gname}"'
    if not gname:
        errors.append("Task group missing name")
    if (group.get("Count") or 0) < 0 and group.get("Count") is not None:
        errors.append(f"{where}: count can't be negative")
    if not group.get("Tasks"):
        errors.append(f"{where}: Missing tasks for task group")
    labels = {p.get("Label") for net in group.get("Networks") or []
              for p in (net.get("DynamicPorts") or []) + (net.get("ReservedPorts") or [])}
    _check_policy(group.get("RestartPolicy"), where, errors)
    for svc in group.get("Services") or []:
        _check_service(svc, labels, where, errors)
    volumes = group.get("Volumes") or {}
    for name, vol in volumes.items():
        if vol.get("Type") not in ("host", "csi"):
            errors.append(f'{where}: volume "{name}" has unrecognised type {vol.get("Type")!r}')
        if not vol.get("Source"):
            errors.append(f'{where}: volume "{name}" has an empty source')
    for task in group.get("Tasks") or []:
        _check_task(task, labels, volumes, f'{where}, Task "{task.get("Name", "")}"', errors)
    # structs.go TaskGroup.Validate; no rule asks a group for a main task
    if sum(1 for t in group.get("Tasks") or [] if t.get("Leader")) > 1:
        errors.append(f"{where}: Only one task may be marked as leader")


def _check_task(task: dict[str, Any], labels: set[Any], volumes: dict[str, Any], where: str,
                errors: list[str]) -> None:
    if not task.get("Name"):
        errors.append(f"{where}: Missing task name")
    if not task.get("Driver"):
        errors.append(f"{where}: Missing task driver")
    if (task.get("KillTimeout") or 0) < 0:
        errors.append(f"{where}: KillTimeout must be a positive value")
    _check_policy(task.get("RestartPolicy"), where, errors)
    _check_lifecycle(task.get("Lifecycle"), where, errors)
    for svc in task.get("Services") or []:
        _check_service(svc, labels, where, errors)
    for mount in task.get("VolumeMounts") or []:
        if mount.get("Volume") not in volumes:
            errors.append(f'{where}: Volume Mount referencing undefined volume '
                          f'{mount.get("Volume")!r}')
    for i, tmpl in enumerate(task.get("Templates") or []):
        _check_template(tmpl, f"{where}, Template[{i}]", errors)


def _check_lifecycle(lifecycle: dict[str, Any] | None, where: str, errors: list[str]) -> None:
    """structs.go TaskLifecycleConfig.Validate, wrapped by Task.Validate ("Lifecycle
    validation failed"); api/tasks.go keeps any non-nil Lifecycle, so a Hook is needed."""
    if lifecycle is None:
        return
    hook = lifecycle.get("Hook") or ""
    if not hook:
        errors.append(f"{where}: Lifecycle validation failed: no lifecycle hook provided")
    elif hook not in ("prestart", "poststart", "poststop"):
        errors.append(f"{where}: Lifecycle validation failed: invalid hook: {hook}")


def _check_policy(policy: dict[str, Any] | None, where: str, errors: list[str]) -> None:
    if not policy:
        return
    if policy.get("Mode") is not None and policy["Mode"] not in RESTART_MODES:
        errors.append(f'{where}: Unsupported restart mode: "{policy["Mode"]}"')
    if (policy.get("Attempts") or 0) < 0 or (policy.get("Delay") or 0) < 0:
        errors.append(f"{where}: restart attempts and delay can't be negative")


def _check_service(svc: dict[str, Any], labels: set[Any], where: str,
                   errors: list[str]) -> None:
    name = svc.get("Name") or ""
    # As Nomad does at registration: each ${...} counts as a one-letter placeholder.
    if not RFC1123.match(PLACEHOLDER.sub("a", name)):
        errors.append(f'{where}: Service name must be valid per RFC 1123 and can contain only '
                      f'alphanumeric characters or dashes: "{name}"')
    label = svc.get("PortLabel") or ""
    if label and not label.isdigit() and label not in labels:
        errors.append(f'{where}: port label "{label}" referenced by services {name} '
                      f'does not exist')
    for check in svc.get("Checks") or []:
        cwhere = f'{where}, service "{name}" check "{check.get("Name", "")}"'
        if check.get("Type") in ("http", "tcp", "grpc"):
            _check_check_timing(check, cwhere, errors)
        if check.get("Type") == "http" and not check.get("Path"):
            errors.append(f"{cwhere}: http type must have http path")
        plabel = check.get("PortLabel")
        if plabel and plabel not in labels:
            errors.append(f'{cwhere}: port label "{plabel}" does not exist')


def _check_template(tmpl: dict[str, Any], where: str, errors: list[str]) -> None:
    mode = tmpl.get("ChangeMode") or "restart"
    if mode not in CHANGE_MODES:
        errors.append(f"{where}: Unknown change mode {mode}")
    if mode == "signal" and not tmpl.get("ChangeSignal"):
        errors.append(f"{where}: Must specify signal value when change mode is signal")
    if not tmpl.get("DestPath"):
        errors.append(f"{where}: Must specify a destination for the template")
    perms = tmpl.get("Perms")
    if perms is not None and not re.fullmatch(r"0?[0-7]{3,4}", perms):
        errors.append(f"{where}: Failed to parse {perms!r} as octal")
    if (tmpl.get("Splay") or 0) < 0:
        errors.append(f"{where}: Must specify positive splay value")
    wait = tmpl.get("Wait") or {}
    # nomad/structs WaitConfig.Validate
    if wait.get("Min") is not None and wait.get("Max") is not None and wait["Min"] > wait["Max"]:
        errors.append(f"{where}: wait min {wait['Min']} is greater than max {wait['Max']}")


def with_defaults(job: dict[str, Any]) -> dict[str, Any]:
    """A copy of `job` with the defaults Nomad's canonicalisation adds."""
    out = copy.deepcopy(job)
    out.setdefault("Name", out["ID"])
    for key, value in (("Namespace", "default"), ("Region", "global"), ("Priority", 50),
                       ("Type", "service"), ("NodePool", "default"), ("AllAtOnce", False)):
        if out.get(key) is None:
            out[key] = value
    if not out.get("Datacenters"):
        out["Datacenters"] = ["*"]
    for group in out.get("TaskGroups") or []:
        if group.get("Count") is None:
            group["Count"] = 1
        for task in group.get("Tasks") or []:
            for tmpl in task.get("Templates") or []:
                _template_defaults(tmpl)
    return out


def _template_defaults(tmpl: dict[str, Any]) -> None:
    """api/tasks.go Template.Canonicalize (run by command/agent ApiJobToStructJob): change
    mode restart, Splay 5s, Perms 0644; Uid/Gid stay unset (the file is the agent's user's)."""
    for key, value in (("ChangeMode", "restart"), ("Splay", 5 * SECOND), ("Perms", "0644"),
                       ("LeftDelim", "{{"), ("RightDelim", "}}"), ("Envvars", False)):
        if tmpl.get(key) is None:
            tmpl[key] = value
