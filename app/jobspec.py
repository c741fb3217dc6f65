"""Nomad job templates: JSON in Nomad's API format with `${name}` placeholders.

Two kinds of `${...}` live in a template. Lower-case names (`${job_id}`, `${kill_timeout_ns}`)
are ours and are filled in here, before the job is submitted; a string that is exactly one
placeholder takes the value's JSON type, so durations become integer nanoseconds as Nomad's
decoder wants. Everything else (`${NOMAD_PORT_http}`, `${meta.x}`, `${node.unique.id}`) is
Nomad's runtime interpolation and is left for the Nomad client. A lower-case name we do not know
is a typo, and stops the template from loading.

Nomad interpolates `${...}` at run time in Env, Meta, service names/tags/meta and driver config,
with no escape (helper/args/args.go ReplaceEnv). So no product-supplied string (product, user
id, engine version) reaches a template as written: `%` and `$` are percent-encoded (`%25`,
`%24`), which Nomad leaves alone and anyone can decode. The docker image is built from a
validated engine_version (`check_version`), which cannot hold a `$`.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.config import ConfigError, Settings
from app.drivers.base import EngineSpec
from app.errors import BadVersion

APP_ROOT = Path(__file__).resolve().parents[1]
NS = 1_000_000_000
# Nomad refuses check intervals and timeouts under one second.
CHECK_INTERVAL_NS = 1 * NS
CHECK_TIMEOUT_NS = 1 * NS
PLACEHOLDERS = ("job_id", "product", "user_id", "engine_version", "engine_image", "volume_name",
                "volume_path", "var_path", "kill_timeout_ns", "check_interval_ns",
                "check_timeout_ns", "python", "app_root", "volume_uid", "volume_gid",
                "snapshot_image", "snapshot_var_path")
SNAPSHOT_TASK = "snapshot"  # the sidecar that copies the brain (app.snapshots.sidecar)
RESTORE_TASK = "restore"    # derived from it: fills a new brain before the engine starts
# A docker tag (distribution/reference), plus `+` for the reference engine's test tokens
# (`ref+fault-crash`): docker itself would refuse a tag with a `+`.
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REFERENCE = re.compile(rf"(?P<repo>(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*)"
                       rf"(?::(?P<tag>{TAG.pattern}))?(?:@(?P<digest>sha256:[0-9a-f]{{64}}))?")
VOLUME_PATH_UNKNOWN = "<the HostPath of volume ${volume_name}, known once it is created>"

_OURS = re.compile(r"\$\{([a-z_]+)\}")


def repository(image: str) -> str:
    """The repository of an image reference (no tag, no digest)."""
    found = REFERENCE.fullmatch(image)
    return found.group("repo") if found else image


def check_version(settings: Settings, version: str) -> None:
    """SPEC "Additions": a tag of ORCH_ENGINE_IMAGE's repository (no `/` or `:`), or a full
    reference whose repository ORCH_ENGINE_IMAGES lists. `latest` (or no tag) is refused:
    the docker driver pulls it on every start (drivers/docker/driver.go createImage)."""
    if "/" not in version and ":" not in version and "@" not in version:
        if not TAG.fullmatch(version):
            raise BadVersion("engine_version must be an image tag ([A-Za-z0-9_.+-], at most "
                             "128) or a full image reference")
        tag: str | None = version
    else:
        found = REFERENCE.fullmatch(version)
        if found is None:
            raise BadVersion("engine_version is not a valid image reference")
        allowed = {repository(settings.engine_image), *settings.engine_images}
        if found.group("repo") not in allowed:
            raise BadVersion(f"engine_version's repository must be one of "
                             f"{', '.join(sorted(allowed))} (ORCH_ENGINE_IMAGES)")
        tag = found.group("tag") or (None if not found.group("digest") else "digest")
    if tag in (None, "latest"):
        raise BadVersion("engine_version must name a tag other than latest, or a digest: "
                         "Nomad's docker driver pulls `latest` on every start")


def image_for(settings: Settings, version: str) -> str:
    """The docker image of an engine_version: a bare tag is one of ORCH_ENGINE_IMAGE's."""
    if "/" not in version and ":" not in version and "@" not in version:
        return f"{repository(settings.engine_image)}:{version}"
    return version


def literal(value: str) -> str:
    """`value` in a form Nomad's runtime interpolation leaves as it is."""
    return value.replace("%", "%25").replace("$", "%24")


def var_path(job_id: str) -> str:
    # Nomad gives a job's tasks read access to nomad/jobs/<job id> without any ACL policy.
    return f"nomad/jobs/{job_id}"


def task_var_path(job_id: str, group: str, task: str) -> str:
    # ...and to nomad/jobs/<job id>/<group>/<task>, to that task alone (acl/acl.go
    # matchingVariablesCapabilitySet): the engine task cannot read the sidecar's.
    return f"{var_path(job_id)}/{group}/{task}"


def snapshot_group(template: dict[str, Any]) -> str | None:
    """The name of the task group whose task `snapshot` copies the brain; None when the
    template has no such task (snapshots on Nomad are off)."""
    for group in template.get("TaskGroups") or []:
        if any(t.get("Name") == SNAPSHOT_TASK for t in group.get("Tasks") or []):
            return str(group.get("Name") or "")
    return None


def sidecar_group(settings: Settings) -> str | None:
    """`snapshot_group` of the configured template."""
    return snapshot_group(load_template(_resolve(settings.nomad_jobspec)))


def render_job(settings: Settings, spec: EngineSpec, volume_path: str | None = None,
               volume_name: str | None = None) -> dict[str, Any]:
    """The Job object (not yet wrapped in {"Job": ...}) for one engine; its brain is the
    volume `volume_name` (default: named like the engine)."""
    template = load_template(_resolve(settings.nomad_jobspec))
    group = snapshot_group(template) or ""
    values: dict[str, Any] = {
        "job_id": spec.name,
        "product": literal(spec.product),
        "user_id": literal(spec.user_id),
        "engine_version": literal(spec.version),
        "engine_image": literal(image_for(settings, spec.version)),
        "volume_uid": settings.nomad_volume_uid,
        "volume_gid": settings.nomad_volume_gid,
        "volume_name": volume_name or spec.name,
        "var_path": var_path(spec.name),
        "snapshot_var_path": task_var_path(spec.name, group, SNAPSHOT_TASK),
        "snapshot_image": settings.snapshot_image,
        "kill_timeout_ns": int(settings.stop_grace_s * NS),
        "check_interval_ns": CHECK_INTERVAL_NS,
        "check_timeout_ns": CHECK_TIMEOUT_NS,
        "python": sys.executable,
        "app_root": str(APP_ROOT),
    }
    values["volume_path"] = volume_path or VOLUME_PATH_UNKNOWN.replace("${volume_name}", spec.name)
    job: dict[str, Any] = _fill(copy.deepcopy(template), values)
    if settings.nomad_namespace:
        job["Namespace"] = settings.nomad_namespace
    if settings.nomad_region:
        job["Region"] = settings.nomad_region
    return job


def check(settings: Settings) -> None:
    """Load the configured template now, so a broken one stops start-up, not a provision;
    and refuse a stop grace Nomad would cut or refuse as the engines' KillTimeout."""
    load_template(_resolve(settings.nomad_jobspec))
    problem = settings.kill_timeout_problem()
    if problem:
        raise ConfigError(problem)


def render_checked(settings: Settings, spec: EngineSpec) -> dict[str, Any]:
    """The job the API would submit for `spec`, or a ConfigError or BadVersion
    saying why the API would refuse it: what `orch jobspec render` shows."""
    check(settings)
    check_version(settings, spec.version)
    return render_job(settings, spec)


@lru_cache(maxsize=8)
def load_template(path: Path) -> dict[str, Any]:
    try:
        template = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the job template: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON: {exc}") from None
    if not isinstance(template, dict) or "Job" in template:
        raise ConfigError(f"{path}: must be a bare Job object (the driver wraps it in {{\"Job\": ...}})")
    unknown = sorted({m for m in _OURS.findall(json.dumps(template)) if m not in PLACEHOLDERS})
    if unknown:
        raise ConfigError(f"{path}: unknown placeholder(s) {', '.join(unknown)}; "
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
