"""The Nomad HTTP calls the Nomad driver makes, with Nomad's own names, and nothing else.

python-nomad for jobs, evaluations, allocations, signals and variables; httpx for dynamic host
volumes, which python-nomad has no call for. Every method is synchronous (both clients are) and
runs on the driver's thread pool. Failures become driver errors: Nomad unreachable or answering
5xx is SchedulerUnavailable; a 4xx is SchedulerRejected (our request was wrong: a bug or a bad
job template); a missing object is None where the caller can use that.
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


class SchedulerRejected(DriverError):
    """Nomad refused a request as malformed: a bug here or in the job template."""

    status, code = 500, "INTERNAL"


class VariableConflict(Exception):
    """A check-and-set write lost to another writer."""


class NomadAPI:
    def __init__(self, settings: Settings):
        self.namespace = settings.nomad_namespace
        self.nomad = nomad.Nomad(address=settings.nomad_addr, token=settings.nomad_token,
                                 namespace=settings.nomad_namespace, region=settings.nomad_region,
                                 timeout=int(TIMEOUT_S))
        headers = {"X-Nomad-Token": settings.nomad_token} if settings.nomad_token else {}
        params = {k: v for k, v in (("namespace", settings.nomad_namespace),
                                    ("region", settings.nomad_region)) if v}
        self.http = httpx.Client(base_url=settings.nomad_addr, headers=headers, params=params,
                                 timeout=TIMEOUT_S, trust_env=False)

    def close(self) -> None:
        self.http.close()

    # ---- jobs, evaluations, allocations -------------------------------------------------------

    def register(self, job: dict[str, Any]) -> str:
        """Register (or re-register) a job; the ID of the evaluation that places it."""
        answer = _call(lambda: self.nomad.job.register_job(job["ID"], {"Job": job}))
        return answer["EvalID"]

    def deregister(self, job_id: str, purge: bool) -> None:
        _call(lambda: self.nomad.job.deregister_job(job_id, purge=purge))

    def job(self, job_id: str) -> dict[str, Any] | None:
        return _call(lambda: self.nomad.job.get_job(job_id), missing=None)

    def jobs(self, prefix: str) -> list[dict[str, Any]]:
        return _call(lambda: self.nomad.jobs.get_jobs(prefix=prefix))

    def evaluation(self, eval_id: str) -> dict[str, Any]:
        return _call(lambda: self.nomad.evaluation.get_evaluation(eval_id))

    def allocations(self, job_id: str) -> list[dict[str, Any]]:
        """The job's allocation stubs (no ports: read `allocation` for those)."""
        return _call(lambda: self.nomad.job.get_allocations(job_id), missing=[])

    def all_allocations(self) -> list[dict[str, Any]]:
        """Every allocation stub in the namespace: one call for a whole fleet's statuses."""
        return _call(lambda: self.nomad.allocations.get_allocations())

    def allocation(self, alloc_id: str) -> dict[str, Any] | None:
        return _call(lambda: self.nomad.allocation.get_allocation(alloc_id), missing=None)

    def signal(self, alloc_id: str, task: str, signal: str) -> bool:
        """Deliver `signal` to the task; False when the allocation is gone."""
        found = _call(lambda: self.nomad.client.allocation.signal_allocation(alloc_id, signal, task),
                      missing=None)
        return found is not None

    # ---- variables ----------------------------------------------------------------------------

    def put_variable(self, path: str, items: dict[str, str], cas: int | None = None) -> dict[str, Any]:
        body = {"Path": path, "Items": items}
        if self.namespace:
            body["Namespace"] = self.namespace
        try:
            return self.nomad.variable.create_variable(path, body, cas=cas)
        except nx.VariableConflict:
            raise VariableConflict(path) from None
        except (nx.BaseNomadException, requests.RequestException) as exc:
            raise _translate(exc) from None

    def variable(self, path: str) -> dict[str, Any] | None:
        return _call(lambda: self.nomad.variable.get_variable(path), missing=None)

    def delete_variable(self, path: str) -> None:
        _call(lambda: self.nomad.variable.delete_variable(path), missing=None)

    def variables(self, prefix: str) -> list[dict[str, Any]]:
        return _call(lambda: self.nomad.variables.get_variables(prefix=prefix))

    # ---- dynamic host volumes (Nomad >= 1.10) -------------------------------------------------

    def create_volume(self, name: str) -> dict[str, Any]:
        volume: dict[str, Any] = {
            "Name": name,
            # "mkdir" is the only plugin a stock client has; left empty it becomes "default",
            # which no client has, and the volume is never placed.
            "PluginID": "mkdir",
            "RequestedCapabilities": [{"AttachmentMode": "file-system",
                                       "AccessMode": "single-node-writer"}],
        }
        if self.namespace:
            volume["Namespace"] = self.namespace
        return self._http("PUT", "/v1/volume/host/create", json={"Volume": volume})["Volume"]

    def volume(self, volume_id: str) -> dict[str, Any] | None:
        return self._http("GET", f"/v1/volume/host/{volume_id}", missing=None)

    def delete_volume(self, volume_id: str) -> None:
        self._http("DELETE", f"/v1/volume/host/{volume_id}/delete", missing=None)

    def volumes(self) -> list[dict[str, Any]]:
        return self._http("GET", "/v1/volumes", params={"type": "host"}) or []

    # ---- the agent -----------------------------------------------------------------------------

    def leader(self) -> str:
        return _call(self.nomad.status.leader.get_leader)

    def _http(self, method: str, path: str, missing: Any = ..., **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SchedulerUnavailable(f"Nomad is unreachable: {type(exc).__name__}") from None
        if response.status_code == 404 and missing is not ...:
            return missing
        if response.status_code >= 500:
            raise SchedulerUnavailable(f"Nomad answered {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise SchedulerRejected(f"Nomad refused {method} {path}: {response.text[:300]}")
        return response.json() if response.content else None


def _call(fn: Callable[[], T], missing: Any = ...) -> T:
    try:
        return fn()
    except nx.URLNotFoundNomadException:
        if missing is ...:
            raise SchedulerRejected("Nomad answered 404") from None
        return missing
    except (nx.BaseNomadException, requests.RequestException) as exc:
        raise _translate(exc) from None


def _translate(exc: Exception) -> DriverError:
    response = getattr(exc, "nomad_resp", None)
    if isinstance(response, requests.Response):
        text = response.text[:300]
        if response.status_code >= 500:
            return SchedulerUnavailable(f"Nomad answered {response.status_code}: {text}")
        return SchedulerRejected(f"Nomad refused the request ({response.status_code}): {text}")
    return SchedulerUnavailable(f"Nomad is unreachable: {type(response or exc).__name__}")
