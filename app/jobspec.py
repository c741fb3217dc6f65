"""Nomad job templates: JSON in Nomad's API format with `${name}` placeholders.

Two kinds of `${...}` live in a template. Lower-case names (`${job_id}`, `${kill_timeout_ns}`)
are ours and are filled in here, before the job is submitted; a string that is exactly one
placeholder takes the value's JSON type, so durations become integer nanoseconds as Nomad's
decoder wants. Everything else (`${NOMAD_PORT_http}`, `${meta.x}`, `${node.unique.id}`) is
Nomad's runtime interpolation and is left for the Nomad client. A lower-case name we do not know
is a typo, and stops the template from loading.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.config import Settings
from app.drivers.base import EngineSpec

APP_ROOT = Path(__file__).resolve().parents[1]
NS = 1_000_000_000
# Nomad refuses check intervals and timeouts under one second.
CHECK_INTERVAL_NS = 1 * NS
CHECK_TIMEOUT_NS = 1 * NS
PLACEHOLDERS = ("job_id", "product", "user_id", "engine_version", "volume_name", "volume_path",
                "var_path", "kill_timeout_ns", "check_interval_ns", "check_timeout_ns", "python",
                "app_root")
VOLUME_PATH_UNKNOWN = "<the HostPath of volume ${volume_name}, known once it is created>"

_OURS = re.compile(r"\$\{([a-z_]+)\}")


class JobspecError(ValueError):
    """A template that cannot be used; str() names the file and the problem."""


def var_path(job_id: str) -> str:
    # Nomad gives a job's tasks read access to nomad/jobs/<job id> without any ACL policy.
    return f"nomad/jobs/{job_id}"


def render_job(settings: Settings, spec: EngineSpec, volume_path: str | None = None) -> dict[str, Any]:
    """The Job object (not yet wrapped in {"Job": ...}) for one engine."""
    values: dict[str, Any] = {
        "job_id": spec.name,
        "product": spec.product,
        "user_id": spec.user_id,
        "engine_version": spec.version,
        "volume_name": spec.name,
        "var_path": var_path(spec.name),
        "kill_timeout_ns": int(settings.stop_grace_s * NS),
        "check_interval_ns": CHECK_INTERVAL_NS,
        "check_timeout_ns": CHECK_TIMEOUT_NS,
        "python": sys.executable,
        "app_root": str(APP_ROOT),
    }
    values["volume_path"] = volume_path or VOLUME_PATH_UNKNOWN.replace("${volume_name}", spec.name)
    job = _fill(copy.deepcopy(load_template(_resolve(settings.nomad_jobspec))), values)
    if settings.nomad_namespace:
        job["Namespace"] = settings.nomad_namespace
    if settings.nomad_region:
        job["Region"] = settings.nomad_region
    return job


def check(settings: Settings) -> None:
    """Load the configured template now, so a broken one stops start-up, not a provision."""
    load_template(_resolve(settings.nomad_jobspec))


@lru_cache(maxsize=8)
def load_template(path: Path) -> dict[str, Any]:
    try:
        template = json.loads(path.read_text())
    except OSError as exc:
        raise JobspecError(f"{path}: cannot read the job template: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise JobspecError(f"{path}: not JSON: {exc}") from None
    if not isinstance(template, dict) or "Job" in template:
        raise JobspecError(f"{path}: must be a bare Job object (the driver wraps it in {{\"Job\": ...}})")
    unknown = sorted({m for m in _OURS.findall(json.dumps(template)) if m not in PLACEHOLDERS})
    if unknown:
        raise JobspecError(f"{path}: unknown placeholder(s) {', '.join(unknown)}; "
                           f"known: {', '.join(PLACEHOLDERS)}")
    return template


def _resolve(path: Path) -> Path:
    # A relative ORCH_NOMAD_JOBSPEC is looked up from the working directory, then the project.
    return path if path.is_absolute() or path.exists() else APP_ROOT / path


def _fill(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {_fill(k, values): _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, str):
        whole = _OURS.fullmatch(node)
        if whole:
            return values[whole.group(1)]
        return _OURS.sub(lambda m: str(values[m.group(1)]), node)
    return node
