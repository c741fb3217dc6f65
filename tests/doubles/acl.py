"""ACLs in the double, as Nomad v1.10.5 enforces them.

Off by default (a dev agent has no ACLs). Turned on through the control API with a set of
tokens, each with the capabilities it grants. A request whose token lacks what its endpoint
needs gets 403 "Permission denied" (structs.ErrPermissionDenied, mapped to 403 by
command/agent/http.go `wrap`); an unknown token gets 403 "ACL token not found"
(structs.ErrTokenNotFound). No token at all is the anonymous token, which grants nothing.

What each endpoint needs follows its RPC handler:
- nomad/job_endpoint.go: Register/Deregister `submit-job`; GetJob, Allocations, Validate
  `read-job`; List `list-jobs`; Register also checks each group host volume's `Source`
  against the token's `host_volume` rules ("Validate Volume Permissions"): a read-write
  mount needs `mount-readwrite`, a read-only one `mount-readonly` or `mount-readwrite`
  (acl/acl.go AllowHostVolumeOperation: an exact name first, else the closest glob);
- nomad/eval_endpoint.go GetEval, nomad/alloc_endpoint.go GetAlloc/List: `read-job`;
- client/alloc_endpoint.go Signal: `alloc-lifecycle`; client/fs_endpoint.go Logs: `read-logs`;
- nomad/host_volume_endpoint.go: Create `host-volume-create`, Get/List `host-volume-read`,
  Delete `host-volume-delete`;
- nomad/variables_endpoint.go: Apply set/CAS `write`, delete `destroy`
  (hasOperationPermissions), Read `read`, List `list`, per path (acl/policy.go
  VariablesCapability*);
- nomad/node_endpoint.go List/GetNode: node `read` (AllowNodeRead).

Capabilities are given expanded (acl/policy.go expandNamespacePolicy turns `policy = "write"`
into a list of them; the double takes the list).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

PERMISSION_DENIED = "Permission denied"
TOKEN_NOT_FOUND = "ACL token not found"


class Forbidden(Exception):
    """Answered as 403 text/plain."""


@dataclass
class Policy:
    namespace: set[str] = field(default_factory=set)          # namespace capabilities
    variables: dict[str, set[str]] = field(default_factory=dict)  # path glob -> capabilities
    node_read: bool = False
    host_volumes: dict[str, set[str]] = field(default_factory=dict)  # name glob -> capabilities

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Policy:
        return cls(namespace=set(raw.get("namespace") or []),
                   variables={p: set(c) for p, c in (raw.get("variables") or {}).items()},
                   node_read=raw.get("node") in ("read", "write"),
                   host_volumes={n: set(c) for n, c in (raw.get("host_volume") or {}).items()})

    def host_volume_allows(self, name: str, capability: str) -> bool:
        # acl.go matchingHostVolumeCapabilitySet: the exact name, else the closest glob.
        caps = self.host_volumes.get(name)
        if caps is None:
            globs = [g for g in self.host_volumes if "*" in g and fnmatch.fnmatchcase(name, g)]
            if not globs:
                return False
            caps = self.host_volumes[max(globs, key=len)]
        return "deny" not in caps and capability in caps

    def variable_allows(self, path: str, capability: str) -> bool:
        # acl.go AllowVariableOperation: the closest matching path spec wins (longest here).
        matches = [spec for spec in self.variables if fnmatch.fnmatchcase(path, spec)]
        if not matches:
            return False
        best = max(matches, key=len)
        caps = self.variables[best]
        return "deny" not in caps and capability in caps


def workload_variables(job: str, group: str, task: str) -> set[str]:
    """acl/acl.go matchingVariablesCapabilitySet: with no policy, a task's workload identity
    may read (and list) exactly these paths in its namespace."""
    base = "nomad/jobs"
    return {base, f"{base}/{job}", f"{base}/{job}/{group}", f"{base}/{job}/{group}/{task}"}


class ACL:
    def __init__(self) -> None:
        self.enabled = False
        self.tokens: dict[str, Policy] = {}

    def configure(self, enabled: bool, tokens: dict[str, dict[str, Any]]) -> None:
        self.enabled = enabled
        self.tokens = {secret: Policy.parse(raw) for secret, raw in tokens.items()}

    def _policy(self, request: Request) -> Policy | None:
        if not self.enabled:
            return None
        secret = request.headers.get("X-Nomad-Token", "")
        auth = request.headers.get("Authorization", "")
        if not secret and auth.startswith("Bearer "):
            secret = auth[len("Bearer "):]
        if not secret:
            return Policy()   # anonymous
        policy = self.tokens.get(secret)
        if policy is None:
            raise Forbidden(TOKEN_NOT_FOUND)
        return policy

    def require_namespace(self, request: Request, capability: str) -> None:
        policy = self._policy(request)
        if policy is not None and capability not in policy.namespace:
            raise Forbidden(PERMISSION_DENIED)

    def require_host_volumes(self, request: Request, job: dict[str, Any]) -> None:
        """nomad/job_endpoint.go Register, "Validate Volume Permissions"."""
        policy = self._policy(request)
        if policy is None:
            return
        for group in job.get("TaskGroups") or []:
            for vol in (group.get("Volumes") or {}).values():
                if vol.get("Type") != "host":
                    raise Forbidden(PERMISSION_DENIED)   # CSI: csi-mount-volume, not modelled
                source = vol.get("Source") or ""
                allowed = policy.host_volume_allows(source, "mount-readwrite") or (
                    bool(vol.get("ReadOnly")) and policy.host_volume_allows(source, "mount-readonly"))
                if not allowed:
                    raise Forbidden(PERMISSION_DENIED)

    def require_variable(self, request: Request, path: str, capability: str) -> None:
        policy = self._policy(request)
        if policy is not None and not policy.variable_allows(path, capability):
            raise Forbidden(PERMISSION_DENIED)

    def variable_filter(self, request: Request) -> Any:
        """Variables.List: entries the token may not `list` are left out, not refused."""
        policy = self._policy(request)
        if policy is None:
            return lambda path: True
        return lambda path: policy.variable_allows(path, "list")

    def require_node_read(self, request: Request) -> None:
        policy = self._policy(request)
        if policy is not None and not policy.node_read:
            raise Forbidden(PERMISSION_DENIED)
