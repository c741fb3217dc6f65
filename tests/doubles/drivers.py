"""What the double's two task drivers turn a Task into: a command line and an environment.

raw_exec runs the configured command as is. docker is emulated by running the project's
reference engine (`python -m app.refengine`) with the container's view of paths and
addresses mapped onto the host (see tests/doubles/README.md, "Emulation rules").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from tests.doubles.state import Alloc

ROOT = Path(__file__).resolve().parents[2]  # the repository: app.refengine lives there
DRIVER_KEYS = {"raw_exec": {"command", "args"}, "docker": {"image", "ports", "args"}}
BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
CRASH_CMD = [sys.executable, "-c", "import sys; sys.exit(1)"]  # the task_crash fault


class DriverError(Exception):
    """The task cannot start; its message becomes the event's DriverError."""


def check_config(task: dict[str, Any], group: dict[str, Any]) -> None:
    """Validate the driver's Config as the real drivers do, so typos fail the task."""
    driver, name = task.get("Driver", ""), task.get("Name", "")
    if driver not in DRIVER_KEYS:
        raise DriverError(f'missing driver "{driver}" (the double has raw_exec and docker)')
    config = task.get("Config") or {}
    unknown = sorted(set(config) - DRIVER_KEYS[driver])
    if unknown:
        raise DriverError(f"failed to decode driver config: An argument named "
                          f"{unknown[0]!r} is not expected here.")
    if driver == "raw_exec":
        _check_raw_exec(config, task, name)
    else:
        _check_docker(config, group)


def _check_raw_exec(config: dict[str, Any], task: dict[str, Any], name: str) -> None:
    if not isinstance(config.get("command"), str) or not config["command"]:
        raise DriverError('failed to decode driver config: The argument "command" is required')
    _string_list(config, "args")
    if task.get("VolumeMounts"):
        raise DriverError(f'task driver "raw_exec" for "{name}" does not support host volumes')


def _check_docker(config: dict[str, Any], group: dict[str, Any]) -> None:
    if not isinstance(config.get("image"), str) or not config["image"]:
        raise DriverError('failed to decode driver config: The argument "image" is required')
    _string_list(config, "args")
    labels = {p.get("Label") for net in group.get("Networks") or []
              for p in (net.get("DynamicPorts") or []) + (net.get("ReservedPorts") or [])}
    for label in _string_list(config, "ports"):
        if label not in labels:
            raise DriverError(f'Port "{label}" not found, check network block')


def _string_list(config: dict[str, Any], key: str) -> list[str]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DriverError(f'failed to decode driver config: "{key}" must be a list of strings')
    return value


def base_env(job_env: dict[str, str]) -> dict[str, str]:
    """The little of the double's own environment a task inherits."""
    env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
    if "PYTHONPATH" in os.environ and "PYTHONPATH" not in job_env:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def command(task: dict[str, Any], config: dict[str, Any], crash: bool) -> list[str]:
    if crash:
        return list(CRASH_CMD)
    if task["Driver"] == "raw_exec":
        return [config["command"], *config.get("args", [])]
    return [sys.executable, "-m", "app.refengine", *config.get("args", [])]


def docker_view(env: dict[str, str], task: dict[str, Any], alloc: Alloc) -> dict[str, str]:
    """Map the container's view onto the host: mount destinations become host paths, the
    image is the default ENGINE_VERSION, 0.0.0.0 becomes loopback, and the code is on
    PYTHONPATH (it is in the image)."""
    mounts = _mounts(task, alloc)
    out = dict(env)
    for key, value in env.items():
        for dest, host in mounts.items():
            if value == dest or value.startswith(dest.rstrip("/") + "/"):
                out[key] = host + value[len(dest.rstrip("/")):]
                break
    if out.get("ENGINE_HOST") == "0.0.0.0":
        out["ENGINE_HOST"] = "127.0.0.1"  # published on the node's loopback here
    out.setdefault("ENGINE_VERSION", (task.get("Config") or {}).get("image", ""))
    if "PYTHONPATH" not in (task.get("Env") or {}):
        out["PYTHONPATH"] = str(ROOT)
    return out


def _mounts(task: dict[str, Any], alloc: Alloc) -> dict[str, str]:
    mounts: dict[str, str] = {}
    for mount in task.get("VolumeMounts") or []:
        volume = alloc.volumes.get(mount.get("Volume") or "")
        if volume is None:
            raise DriverError(f'volume_mount references unknown volume "{mount.get("Volume")}"')
        mounts[mount.get("Destination") or ""] = volume["HostPath"]
    return mounts
