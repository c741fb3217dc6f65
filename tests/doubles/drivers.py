"""What the double's two task drivers turn a Task into: a command line and an environment.

raw_exec runs the configured command as is. docker is emulated by running the image's
ENTRYPOINT (the reference engine, `python -m app.refengine`, unless the config's
`entrypoint` replaces it) + `command`/`args`, with the container's view of paths and
addresses mapped onto the host (see tests/doubles/README.md, "Emulation rules").
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.doubles.state import Alloc
from tests.doubles.volumes import CLIENT_UID, owner_and_mode

ROOT = Path(__file__).resolve().parents[2]  # the repository: app.refengine lives there
DRIVER_KEYS = {"raw_exec": {"command", "args"},
               "docker": {"image", "ports", "args", "command", "entrypoint"}}
BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
CRASH_CMD = [sys.executable, "-c", "import sys; sys.exit(1)"]  # the task_crash fault


def failing_cmd(name: str) -> list[str]:
    """The fail_tasks fault: the task starts, says why on stderr, and exits 1."""
    line = f"the double's fail_tasks fault: task {name!r} fails at start"
    return [sys.executable, "-c", f"import sys; sys.stderr.write({line!r} + '\\n'); sys.exit(1)"]
# The user every emulated image runs as: jobspecs/Dockerfile.refengine's `USER 65534:65534`.
IMAGE_UID = IMAGE_GID = 65534
# ... and its ENTRYPOINT: `command`/`args` only set the container's Cmd, appended to it.
IMAGE_ENTRYPOINT = ["python", "-m", "app.refengine"]
PYTHONS = ("python", "python3")   # the image's interpreter is the double's


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
    _string_list(config, "entrypoint")
    command = config.get("command")
    if command is not None:
        # drivers/docker/driver.go createContainerConfig -> validateCommand
        if not isinstance(command, str) or not command.strip():
            raise DriverError(f"command empty: {json.dumps(command)}")
        if command.strip() != command:
            raise DriverError(f"command contains extra white space: {json.dumps(command)}")
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


def pull_image(task: dict[str, Any]) -> None:
    """drivers/docker/driver.go createImage: a `latest` (or missing) tag is always pulled;
    any other tag is used from the node's image store when present. The double's image
    store holds every non-latest tag (images built on the node) and no registry answers a
    pull, so `latest` fails as a locally built image does on a real node."""
    if task.get("Driver") != "docker":
        return
    image = (task.get("Config") or {}).get("image", "")
    name = image.rsplit("/", 1)[-1]
    if "@" in name:
        return   # pinned by digest
    tag = name.partition(":")[2]
    if tag in ("", "latest"):
        repo = image[:len(image) - len(tag) - 1] if tag else image
        raise DriverError(f"Failed to pull `{image}`: Error response from daemon: pull access "
                          f"denied for {repo}, repository does not exist or may require "
                          f"'docker login'")


def container_denied(task: dict[str, Any], alloc: Alloc, env: dict[str, str]) -> str | None:
    """What the container's user (IMAGE_UID) cannot do that the engine must: write its brain
    (a host volume: owner and mode from the mkdir plugin's Parameters, volumes.py) and read
    its key (a template: the client's user unless Uid/Gid, Perms). None when all is well.
    The double runs every process as one user, so it checks this instead of the kernel."""
    if task.get("Driver") != "docker":
        return None
    for mount in task.get("VolumeMounts") or []:
        volume = alloc.volumes.get(mount.get("Volume") or "")
        if volume is None or mount.get("ReadOnly"):
            continue
        if not _allowed(*owner_and_mode(volume), want=0o3):
            return f"PermissionError: [Errno 13] Permission denied: '{mount.get('Destination')}'"
    for tmpl in task.get("Templates") or []:
        # template.go: Uid/Gid only when set and >= 0; otherwise the agent's user owns it
        uid, gid = (tmpl[k] if (tmpl.get(k) or 0) > 0 or tmpl.get(k) == 0 else CLIENT_UID
                    for k in ("Uid", "Gid"))
        if not _allowed(uid, gid, int(tmpl.get("Perms") or "0644", 8), want=0o4):
            return f"PermissionError: [Errno 13] Permission denied: '{tmpl.get('DestPath')}'"
    return None


def _allowed(uid: int, gid: int, mode: int, want: int) -> bool:
    """Unix permission check of `want` (4 read, 2 write, 1 search) for the image's user."""
    if IMAGE_UID == 0:
        return True
    if uid == IMAGE_UID:
        bits = (mode >> 6) & 7
    elif gid == IMAGE_GID:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def command(task: dict[str, Any], config: dict[str, Any], crash: bool,
            denied: str | None = None) -> list[str]:
    if crash:
        return list(CRASH_CMD)
    if denied:   # the engine starts, fails on its brain or key, and exits 1
        return [sys.executable, "-c", f"import sys; sys.stderr.write({denied!r} + '\\n'); sys.exit(1)"]
    if task["Driver"] == "raw_exec":
        return [config["command"], *config.get("args", [])]
    return docker_argv(config)


def docker_argv(config: dict[str, Any]) -> list[str]:
    """drivers/docker/driver.go createContainerConfig: Entrypoint is the config's
    `entrypoint` (else the image's), Cmd is `command` + `args` (else `args`); the container
    runs Entrypoint + Cmd. `python`/`python3` is the double's interpreter."""
    cmd = [config["command"], *config.get("args", [])] if config.get("command") \
        else list(config.get("args", []))
    argv = [*(config.get("entrypoint") or IMAGE_ENTRYPOINT), *cmd]
    if argv[0] in PYTHONS:
        argv[0] = sys.executable
    return argv


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
    for key, value in out.items():
        if value == "0.0.0.0":
            out[key] = "127.0.0.1"  # a bind-all address: published on the node's loopback
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
