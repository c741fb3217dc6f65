"""Strict validation of request bodies against the Go struct shapes of Nomad's and Consul's
`api` modules (schema/nomad.json, schema/consul.json; see /work/shared/nomad-api/README.md).

Real Nomad ignores unknown keys and matches keys case-insensitively, so a typo in a jobspec
goes unnoticed until production. This validator is deliberately stricter: every unknown key,
wrong-case key, wrong type or string duration is an error, with a JSON path.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
# RFC 3339 as Go's time.Time decodes it (fractional seconds optional, zone required).
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
MAX_ERRORS = 50  # enough to see every typo of a jobspec, bounded against hostile bodies


@cache
def load(name: str) -> dict[str, Any]:
    """`name` is "nomad" or "consul"."""
    return json.loads((SCHEMA_DIR / f"{name}.json").read_text())


def validate(schema: dict[str, Any], struct_name: str, value: Any) -> list[str]:
    """Errors (each naming a JSON path) of `value` as a `struct_name`; [] when valid."""
    errors: list[str] = []
    _check_struct(schema, struct_name, value, struct_name, errors)
    return errors[:MAX_ERRORS]


def _check_struct(schema: dict[str, Any], name: str, value: Any, path: str,
                  errors: list[str]) -> None:
    struct = schema["structs"].get(name)
    if struct is None:
        errors.append(f"{path}: schema has no struct {name}")
        return
    if not isinstance(value, dict):
        errors.append(f"{path}: json: cannot unmarshal {_json_kind(value)} into Go value "
                      f"of type api.{name}")
        return
    fields = struct["fields"]
    for key, item in value.items():
        spec = fields.get(key)
        if spec is None:
            hint = _case_hint(fields, key)
            errors.append(f'{path}: json: unknown field "{key}"{hint}')
            continue
        sub = f"{path}.{key}"
        if item is None:
            if not (spec.get("nullable") or _nil_able(spec["type"])):
                errors.append(f"{sub}: null is not allowed (field is not a pointer, list, "
                              f"map or interface)")
            continue
        _check_type(schema, spec["type"], item, sub, errors)
        _check_named(schema, spec.get("named"), item, sub, errors)


def _case_hint(fields: dict[str, Any], key: str) -> str:
    # Go would silently accept a wrong-case key; say which one was meant.
    for known in fields:
        if known.lower() == key.lower():
            return f' (keys are case-sensitive here: did you mean "{known}"?)'
    return ""


def _nil_able(descriptor: Any) -> bool:
    if descriptor == "any":
        return True
    return isinstance(descriptor, dict) and ("list" in descriptor or "map" in descriptor)


def _check_type(schema: dict[str, Any], descriptor: Any, value: Any, path: str,
                errors: list[str]) -> None:
    if isinstance(descriptor, str):
        problem = _scalar_problem(descriptor, value)
        if problem:
            errors.append(f"{path}: {problem}")
        return
    if "ref" in descriptor:
        _check_struct(schema, descriptor["ref"], value, path, errors)
    elif "list" in descriptor:
        if not isinstance(value, list):
            errors.append(f"{path}: json: cannot unmarshal {_json_kind(value)} into a list")
            return
        for i, item in enumerate(value):
            _check_item(schema, descriptor["list"], item, f"{path}[{i}]", errors)
    elif "map" in descriptor:
        if not isinstance(value, dict):
            errors.append(f"{path}: json: cannot unmarshal {_json_kind(value)} into a map")
            return
        for key, item in value.items():
            _check_item(schema, descriptor["map"], item, f"{path}[{json.dumps(key)}]", errors)
    else:
        errors.append(f"{path}: type {descriptor} cannot be checked (unresolved)")


def _check_item(schema: dict[str, Any], descriptor: Any, item: Any, path: str,
                errors: list[str]) -> None:
    # A list or map element may be null only if it is itself a pointer-ish type: elements
    # of a []string or map[string]string cannot.
    if item is None:
        if not (_nil_able(descriptor) or (isinstance(descriptor, dict) and "ref" in descriptor)):
            errors.append(f"{path}: null is not allowed here")
        return
    _check_type(schema, descriptor, item, path, errors)


def _scalar_problem(kind: str, value: Any) -> str | None:
    if kind == "any":
        return None
    if kind == "string":
        return None if isinstance(value, str) else _mismatch(value, "string")
    if kind == "bool":
        return None if isinstance(value, bool) else _mismatch(value, "bool")
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else _mismatch(value, "int")
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else _mismatch(value, "float64")
    if kind == "duration_ns":
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        extra = " (durations are integer nanoseconds: 10s is 10000000000)" \
            if isinstance(value, str) else ""
        return _mismatch(value, "time.Duration") + extra
    if kind == "time":
        if isinstance(value, str) and RFC3339.match(value):
            return None
        return f"parsing time {json.dumps(value)}: not an RFC 3339 time"
    return f"unknown type descriptor {kind!r}"


def _mismatch(value: Any, go_type: str) -> str:
    return f"json: cannot unmarshal {_json_kind(value)} into Go value of type {go_type}"


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _check_named(schema: dict[str, Any], named: str | None, value: Any, path: str,
                 errors: list[str]) -> None:
    """Enum-like named types (HostVolumeAccessMode, ...) take only their declared constants."""
    if not named:
        return
    spec = schema.get("named_types", {}).get(named)
    if not spec or not spec.get("constants"):
        return
    allowed = list(spec["constants"].values())
    if value not in allowed:
        errors.append(f"{path}: {json.dumps(value)} is not a valid {named} "
                      f"(one of {', '.join(json.dumps(v) for v in allowed)})")
