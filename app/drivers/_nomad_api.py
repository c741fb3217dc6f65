"""The Nomad HTTP calls the Nomad driver makes, with Nomad's own names, and nothing else.

python-nomad for jobs, evaluations, allocations, signals and variables; httpx for dynamic host
volumes, nodes and job validation, which python-nomad has no call for. Every method is
synchronous (both clients are) and runs on the driver's thread pool.

Failures become driver errors. Nomad unreachable is SchedulerUnavailable. An answer Nomad gives
as an error is a NomadError (a SchedulerUnavailable) carrying its status and text: Nomad's RPC
layer answers most refusals uncoded, as 500 (command/agent/http.go `wrap`), so callers that can
tell "no such volume" from "Nomad is down" match the text (see nomad.py). A 403 is
PermissionDenied, naming the ACL capability the call needs (nomad/README.md has the policy). A
400 is SchedulerRejected (our request was malformed: a bug here or in the job template). A
missing object is None where the caller can use that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import requests
from nomad.api import exceptions as nx

import nomad
from app.config import Settings
from app.drivers.base import DriverError, SchedulerUnavailable

T = TypeVar("T")
TIMEOUT_S = 10.0
NO_ANSWER: Any = ...  # `missing` default: a 404 is an error, not an answer


class SchedulerRejected(DriverError):
    """Nomad refused a request as malformed: a bug here or in the job template."""

    code = "INTERNAL"


class NomadError(SchedulerUnavailable):
    """Nomad answered an error (5xx, or an unexpected 404); `text` is its body."""

    def __init__(self, message: str, http_status: int, text: str):
        super().__init__(message)
        self.http_status, self.text = http_status, text


class PermissionDenied(SchedulerUnavailable):
    """Nomad answered 403: the token lacks the ACL capability `need`."""


class VariableConflict(Exception):
    """A check-and-set write lost to another writer."""


class NomadAPI:
    def __init__(self, settings: Settings, timeout: float = TIMEOUT_S):
        self.namespace = settings.nomad_namespace
        # python-nomad is untyped
        self.nomad = nomad.Nomad(address=settings.nomad_addr,  # type: ignore[attr-defined]
                                 token=settings.nomad_token,
                                 namespace=settings.nomad_namespace, region=settings.nomad_region,
                                 timeout=int(max(1, timeout)))
        headers = {"X-Nomad-Token": settings.nomad_token} if settings.nomad_token else {}
        params = {k: v for k, v in (("namespace", settings.nomad_namespace),
                                    ("region", settings.nomad_region)) if v}
        self.http = httpx.Client(base_url=settings.nomad_addr, headers=headers, params=params,
                                 timeout=timeout, trust_env=False)

    def close(self) -> None:
        self.http.close()

    # ---- jobs, evaluations, allocations -------------------------------------------------------

    def register(self, job: dict[str, Any]) -> str:
        """Register (or re-register) a job; the ID of the evaluation that places it."""
        # Job.Register checks submit-job and then each host volume the job mounts
        # (nomad/job_endpoint.go Register, "Validate Volume Permissions"): one 403 for both.
        sources = sorted({v.get("Source") or "" for g in job.get("TaskGroups") or []
                          for v in (g.get("Volumes") or {}).values() if v.get("Type") == "host"})
        need = "namespace capability submit-job" + "".join(
            f' and host_volume "{s}" capability mount-readwrite' for s in sources)
        answer = _call(lambda: self.nomad.job.register_job(job["ID"], {"Job": job}), need=need)
        return str(answer["EvalID"])

    def validate(self, job: dict[str, Any]) -> list[str]:
        """Nomad's own validation of a job (PUT /v1/validate/job): its errors, [] if none."""
        answer = self._http("PUT", "/v1/validate/job", need="namespace capability read-job",
                            json={"Job": job})
        return list(answer.get("ValidationErrors") or [])

    def deregister(self, job_id: str, purge: bool) -> None:
        _call(lambda: self.nomad.job.deregister_job(job_id, purge=purge),
              need="namespace capability submit-job")

    def job(self, job_id: str) -> dict[str, Any] | None:
        return _maybe(_call(lambda: self.nomad.job.get_job(job_id), missing=None,
                            need="namespace capability read-job"))

    def jobs(self, prefix: str) -> list[dict[str, Any]]:
        """Job stubs with their Meta (a stub carries Meta only when asked: ?meta=true)."""
        return _call(lambda: self.nomad.jobs.get_jobs(prefix=prefix, meta=True),
                     need="namespace capability list-jobs")

    def evaluation(self, eval_id: str) -> dict[str, Any]:
        return _call(lambda: self.nomad.evaluation.get_evaluation(eval_id),
                     need="namespace capability read-job")

    def evaluations(self, job_id: str) -> list[dict[str, Any]]:
        return _call(lambda: self.nomad.job.get_evaluations(job_id), missing=[],
                     need="namespace capability read-job")

    def allocations(self, job_id: str) -> list[dict[str, Any]]:
        """The job's allocation stubs (no ports: read `allocation` for those)."""
        return _call(lambda: self.nomad.job.get_allocations(job_id), missing=[],
                     need="namespace capability read-job")

    def all_allocations(self) -> list[dict[str, Any]]:
        """Every allocation stub in the namespace: one call for a whole fleet's statuses."""
        return _call(lambda: self.nomad.allocations.get_allocations(),
                     need="namespace capability read-job")

    def allocation(self, alloc_id: str) -> dict[str, Any] | None:
        return _maybe(_call(lambda: self.nomad.allocation.get_allocation(alloc_id), missing=None,
                            need="namespace capability read-job"))

    def signal(self, alloc_id: str, task: str, signal: str) -> bool:
        """Deliver `signal` to the task; False when the allocation is gone."""
        found = _call(lambda: self.nomad.client.allocation.signal_allocation(alloc_id, signal, task),
                      missing=None, need="namespace capability alloc-lifecycle")
        return found is not None

    # ---- nodes ----------------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """Node stubs with their NodeResources and ReservedResources (?resources=true)."""
        return list(self._http("GET", "/v1/nodes", params={"resources": "true"},
                               need="node read") or [])

    def allocations_with_resources(self) -> list[dict[str, Any]]:
        """Every allocation stub with its AllocatedResources (?resources=true): what each node
        has left is its NodeResources less these."""
        return list(self._http("GET", "/v1/allocations", params={"resources": "true"},
                               need="namespace capability read-job") or [])

    def node(self, node_id: str) -> dict[str, Any] | None:
        return _maybe(self._http("GET", f"/v1/node/{node_id}", missing=None, need="node read"))

    def node_status(self, node_id: str) -> str | None:
        """The node's Status ("ready", "down", ...), or None for a node Nomad does not know
        (each caller says what an unknown node means for it)."""
        node = self.node(node_id)
        return None if node is None else str(node.get("Status"))

    # ---- variables ----------------------------------------------------------------------------

    def put_variable(self, path: str, items: dict[str, str], cas: int | None = None) -> dict[str, Any]:
        body = {"Path": path, "Items": items}
        if self.namespace:
            body["Namespace"] = self.namespace
        try:
            return dict(self.nomad.variable.create_variable(path, body, cas=cas))
        except nx.VariableConflict:
            raise VariableConflict(path) from None
        except (nx.BaseNomadException, requests.RequestException) as exc:
            raise _translate(exc, f"variables capability write on {path}") from None

    def variable(self, path: str) -> dict[str, Any] | None:
        return _maybe(_call(lambda: self.nomad.variable.get_variable(path), missing=None,
                            need=f"variables capability read on {path}"))

    def delete_variable(self, path: str) -> None:
        _call(lambda: self.nomad.variable.delete_variable(path), missing=None,
              need=f"variables capability destroy on {path}")

    def variables(self, prefix: str) -> list[dict[str, Any]]:
        # Without `list` on a path, Nomad leaves its variables out of the answer (no 403).
        return _call(lambda: self.nomad.variables.get_variables(prefix=prefix),
                     need=f"variables capability list on {prefix}*")

    # ---- dynamic host volumes (Nomad >= 1.10) -------------------------------------------------

    def create_volume(self, name: str, node_id: str, parameters: dict[str, str]) -> dict[str, Any]:
        volume: dict[str, Any] = {
            "Name": name,
            # "mkdir" is the only plugin a stock client has; left empty it becomes "default",
            # which no client has, and the volume is never placed.
            "PluginID": "mkdir",
            # Without a NodeID the server takes the first feasible node in node-ID order
            # (nomad/host_volume_endpoint.go placeHostVolume): every engine on one node.
            "NodeID": node_id,
            # uid/gid/mode of the directory (client/hostvolumemanager mkdir plugin); unset,
            # it is root's and 0700, and a non-root image cannot write its brain.
            "Parameters": parameters,
            "RequestedCapabilities": [{"AttachmentMode": "file-system",
                                       "AccessMode": "single-node-writer"}],
        }
        if self.namespace:
            volume["Namespace"] = self.namespace
        answer = self._http("PUT", "/v1/volume/host/create", json={"Volume": volume},
                            need="namespace capability host-volume-create")
        return dict(answer["Volume"])

    def volume(self, volume_id: str) -> dict[str, Any] | None:
        return _maybe(self._http("GET", f"/v1/volume/host/{volume_id}", missing=None,
                                 need="namespace capability host-volume-read"))

    def delete_volume(self, volume_id: str) -> None:
        # Never force=true: Nomad would forget the volume, and its node would bring it back.
        self._http("DELETE", f"/v1/volume/host/{volume_id}",
                   need="namespace capability host-volume-delete")

    def volumes(self, prefix: str = "") -> list[dict[str, Any]]:
        """Host volume stubs; with a prefix, those whose Name or ID starts with it
        (nomad/host_volume_endpoint.go List), not the whole fleet's."""
        params = {"type": "host", **({"prefix": prefix} if prefix else {})}
        return list(self._http("GET", "/v1/volumes", params=params,
                               need="namespace capability host-volume-read") or [])

    # ---- the agent -----------------------------------------------------------------------------

    def leader(self) -> str:
        return str(_call(self.nomad.status.leader.get_leader))

    def _http(self, method: str, path: str, missing: Any = NO_ANSWER, need: str = "",
              **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SchedulerUnavailable(f"Nomad is unreachable: {type(exc).__name__}") from None
        if response.status_code == 404 and missing is not NO_ANSWER:
            return missing
        if response.status_code >= 300:
            raise _error(response.status_code, response.text, f"{method} {path}", need)
        return response.json() if response.content else None


def _maybe(value: Any) -> dict[str, Any] | None:
    return None if value is None else dict(value)


def _call(fn: Callable[[], T], missing: Any = NO_ANSWER, need: str = "") -> T:
    try:
        return fn()
    except nx.URLNotFoundNomadException as exc:
        if missing is NO_ANSWER:
            raise _translate(exc, need) from None
        return missing  # type: ignore[no-any-return]
    except (nx.BaseNomadException, requests.RequestException) as exc:
        raise _translate(exc, need) from None


def _translate(exc: Exception, need: str) -> DriverError:
    response = getattr(exc, "nomad_resp", None)
    if isinstance(response, requests.Response):
        request = response.request
        return _error(response.status_code, response.text,
                      f"{request.method} {request.path_url}" if request else "a request", need)
    return SchedulerUnavailable(f"Nomad is unreachable: {type(response or exc).__name__}")


def _error(status: int, text: str, what: str, need: str) -> DriverError:
    text = text[:300]
    if status == 403:
        return PermissionDenied(f"Nomad refused {what} (403 {text.strip()}): the token needs "
                                f"{need or 'a capability'} (the policy is in nomad/README.md)")
    if 400 <= status < 500 and status != 404:
        return SchedulerRejected(f"Nomad refused {what} ({status}): {text}")
    return NomadError(f"Nomad answered {status} to {what}: {text}", status, text)
