"""Runtime interpolation (`${NOMAD_PORT_http}`, `${meta.x}`, ...) and the small subset of
consul-template the double renders: `{{ with nomadVar "path" }}...{{ .key }}...{{ end }}`.

Anything else inside `{{ }}` is a template error (the task fails), so a jobspec using a
construct the double does not know shows up instead of rendering something wrong.
"""

from __future__ import annotations

import re
from typing import Any

from tests.doubles.state import DATACENTER, NODE_ID, NODE_NAME, REGION, Alloc

INTERP = re.compile(r"\$\{([^}]+)\}")
ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
WITH_VAR = re.compile(r'^with\s+nomadVar\s+"([^"]+)"$')
FIELD = re.compile(r"^\.([A-Za-z_][A-Za-z0-9_]*)$")


class TemplateError(Exception):
    pass


class MissingVariable(Exception):
    """A template reads a variable that does not exist yet: the task waits (as Nomad's does)."""


class Denied(Exception):
    """The task's workload identity may not read this variable: the server answers 403."""


def task_env(alloc: Alloc, task: dict[str, Any], dirs: dict[str, str]) -> dict[str, str]:
    """The NOMAD_* variables Nomad puts in every task's environment."""
    job = alloc.job
    env = {
        "NOMAD_ALLOC_DIR": dirs["alloc"], "NOMAD_TASK_DIR": dirs["local"],
        "NOMAD_SECRETS_DIR": dirs["secrets"], "NOMAD_ALLOC_ID": alloc.id,
        "NOMAD_SHORT_ALLOC_ID": alloc.id[:8],
        "NOMAD_ALLOC_NAME": f"{alloc.job_id}.{alloc.group}[0]",
        "NOMAD_ALLOC_INDEX": "0", "NOMAD_JOB_ID": alloc.job_id,
        "NOMAD_JOB_NAME": job.get("Name") or alloc.job_id, "NOMAD_TASK_NAME": task["Name"],
        "NOMAD_GROUP_NAME": alloc.group, "NOMAD_NAMESPACE": job.get("Namespace") or "default",
        "NOMAD_REGION": job.get("Region") or REGION, "NOMAD_DC": DATACENTER,
        "NOMAD_CPU_LIMIT": str((task.get("Resources") or {}).get("CPU") or 100),
        "NOMAD_MEMORY_LIMIT": str((task.get("Resources") or {}).get("MemoryMB") or 300),
    }
    for label, port in alloc.ports.items():
        env[f"NOMAD_PORT_{label}"] = str(port)      # host networking: inside == host port
        env[f"NOMAD_HOST_PORT_{label}"] = str(port)
        env[f"NOMAD_IP_{label}"] = "127.0.0.1"
        env[f"NOMAD_HOST_IP_{label}"] = "127.0.0.1"
        env[f"NOMAD_ADDR_{label}"] = f"127.0.0.1:{port}"
        env[f"NOMAD_HOST_ADDR_{label}"] = f"127.0.0.1:{port}"
    for key, value in _meta(alloc, task).items():
        env[f"NOMAD_META_{key}"] = value
    return env


def _meta(alloc: Alloc, task: dict[str, Any]) -> dict[str, str]:
    # Nomad merges job, group and task meta, the innermost winning.
    group = next(g for g in alloc.job["TaskGroups"] if g["Name"] == alloc.group)
    merged: dict[str, str] = {}
    for layer in (alloc.job.get("Meta"), group.get("Meta"), task.get("Meta")):
        merged.update(layer or {})
    return merged


def interpolate(text: str, env: dict[str, str], meta: dict[str, str]) -> str:
    """Replace known `${...}`; unknown ones stay as written (Nomad leaves them too)."""
    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if key in env:
            return env[key]
        if key == "node.unique.id":
            return NODE_ID
        if key == "node.unique.name":
            return NODE_NAME
        if key == "node.datacenter":
            return DATACENTER
        if key == "node.region":
            return REGION
        if key.startswith("meta.") and key[5:] in meta:
            return meta[key[5:]]
        if key.startswith("env.") and key[4:] in env:
            return env[key[4:]]
        return match.group(0)
    return INTERP.sub(one, text)


def interpolate_any(value: Any, env: dict[str, str], meta: dict[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, env, meta)
    if isinstance(value, list):
        return [interpolate_any(v, env, meta) for v in value]
    if isinstance(value, dict):
        return {k: interpolate_any(v, env, meta) for k, v in value.items()}
    return value


def variable_paths(tmpl: str) -> set[str]:
    """Paths of the variables a template reads (to re-render it when one changes)."""
    return {m.group(1) for m in re.finditer(r'nomadVar\s+"([^"]+)"', tmpl)}


def render(tmpl: str, variables: dict[str, dict[str, Any]],
           readable: set[str] | None = None) -> str:
    """Render the supported subset. Raises MissingVariable, Denied or TemplateError.
    `readable`: the paths the task's workload identity may read (None: ACLs off)."""
    out: list[str] = []
    scope: list[dict[str, str]] = []  # the `with` stack: the items in `.`
    pos = 0
    for match in ACTION.finditer(tmpl):
        text = tmpl[pos:match.start()]
        if match.group(1):
            text = text.rstrip()      # `{{-` trims whitespace before
        out.append(text)
        pos = match.end()
        if match.group(3):
            while pos < len(tmpl) and tmpl[pos].isspace():
                pos += 1              # `-}}` trims whitespace after
        out.append(_action(match.group(2), scope, variables, readable))
    if scope:
        raise TemplateError("template: unexpected EOF (a `with` has no `end`)")
    out.append(tmpl[pos:])
    return "".join(out)


def _action(body: str, scope: list[dict[str, str]], variables: dict[str, dict[str, Any]],
            readable: set[str] | None) -> str:
    if body.startswith("/*") and body.endswith("*/"):
        return ""                     # a comment
    with_var = WITH_VAR.match(body)
    if with_var:
        if readable is not None and with_var.group(1) not in readable:
            raise Denied(with_var.group(1))
        var = variables.get(with_var.group(1))
        if var is None:
            raise MissingVariable(with_var.group(1))
        scope.append(var.get("Items") or {})
        return ""
    if body == "end":
        if not scope:
            raise TemplateError("template: unexpected {{end}}")
        scope.pop()
        return ""
    field = FIELD.match(body)
    if field:
        if not scope:
            raise TemplateError(f"template: {{{{{body}}}}} outside a `with nomadVar` block")
        # Items is a map: a missing key renders as Go's "<no value>".
        return scope[-1].get(field.group(1), "<no value>")
    raise TemplateError(f"template: the double does not support {{{{ {body} }}}}")
