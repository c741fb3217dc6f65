"""The Nomad HTTP API of the double: jobs, evaluations, allocations, nodes, signals, logs
(this file) plus host volumes (volumes.py) and variables (nomad_store_api.py).

Follows command/agent/{job,eval,alloc,node}_endpoint.go and http.go `wrap` at v1.10.5: errors
the HTTP layer codes (decode failures, "Job must be specified", an ID not matching the URL)
are 400; errors from the RPC layer that carry no code (the job's own validation in
nomad/job_endpoint.go `Register`, a signal to an unknown task in client/alloc_endpoint.go) are
500; "Permission denied" is 403.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from tests.doubles import events, jobcheck, views
from tests.doubles.acl import ACL, Forbidden
from tests.doubles.httputil import (
    BadRequest,
    NotFound,
    ServerError,
    blocking_params,
    json_response,
    read_body,
    refuse,
    routes,
    text_response,
    truthy,
)
from tests.doubles.nomad_store_api import store_routes
from tests.doubles.scheduler import Cluster
from tests.doubles.state import State
from tests.doubles.tasks import parse_signal


def _is_bare_job(raw: bytes) -> bool:
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False   # read_body reports bad JSON
    return isinstance(parsed, dict) and "Job" not in parsed


class NomadAPI:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.state: State = cluster.state
        self.acl = ACL()

    def headers(self) -> dict[str, str]:
        return {"X-Nomad-Index": str(self.state.index), "X-Nomad-KnownLeader": "true",
                "X-Nomad-LastContact": "0"}

    def ok(self, body: Any) -> Response:
        return json_response(body, self.headers())

    async def block(self, request: Request) -> None:
        index, wait = blocking_params(request)
        if index is not None:
            await self.state.wait_past(index, wait)

    def app(self) -> Starlette:
        table = [
            ("/v1/status/leader", ["GET"], self.leader),
            ("/v1/agent/self", ["GET"], self.agent_self),
            ("/v1/jobs", ["GET"], self.list_jobs),
            ("/v1/jobs", ["PUT", "POST"], self.register),
            ("/v1/job/{job_id}", ["PUT", "POST"], self.register),
            ("/v1/job/{job_id}", ["GET"], self.get_job),
            ("/v1/job/{job_id}", ["DELETE"], self.deregister),
            ("/v1/job/{job_id}/allocations", ["GET"], self.job_allocs),
            ("/v1/allocations", ["GET"], self.list_allocs),
            ("/v1/evaluation/{eval_id}", ["GET"], self.get_eval),
            ("/v1/allocation/{alloc_id}", ["GET"], self.get_alloc),
            ("/v1/client/allocation/{alloc_id}/signal", ["PUT", "POST"], self.signal),
            ("/v1/client/fs/logs/{alloc_id}", ["GET"], self.logs),
            ("/v1/job/{job_id}/evaluations", ["GET"], self.job_evals),
            ("/v1/validate/job", ["PUT", "POST"], self.validate),
            ("/v1/event/stream", ["GET"], self.event_stream),
            ("/v1/nodes", ["GET"], self.list_nodes),
            ("/v1/node/{node_id}", ["GET"], self.get_node),
            *store_routes(self),
        ]
        return Starlette(routes=routes(self.state, "nomad", table), exception_handlers={
            BadRequest: self._bad_request, NotFound: self._not_found,
            ServerError: self._server_error, Forbidden: self._forbidden})

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        return text_response(str(exc), 500, self.headers())

    async def _forbidden(self, request: Request, exc: Exception) -> Response:
        return text_response(str(exc), 403, self.headers())

    async def _bad_request(self, request: Request, exc: Exception) -> Response:
        return text_response(str(exc), 400, self.headers())

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return text_response(str(exc), 404, self.headers())

    # ---- status --------------------------------------------------------------------------

    async def leader(self, request: Request) -> Response:
        return self.ok("127.0.0.1:4647")

    async def agent_self(self, request: Request) -> Response:
        first = next(iter(self.state.nodes.values()))
        return self.ok({"config": {"Region": "global", "Datacenter": "dc1",
                                   "NodeName": first.name, "Version": {"Version": "1.10.5"}},
                        "member": {"Name": first.name, "Addr": "127.0.0.1", "Port": 4648,
                                   "Status": "alive"},
                        "stats": {"client": {"node_id": first.id}}})

    # ---- events (command/agent/event_endpoint.go EventStream; events.py) -------------------

    async def event_stream(self, request: Request) -> Response:
        index, topics = events.parse_index(request), events.parse_topics(request)
        # nomad/event_endpoint.go validateNsOp: refused before anything is streamed
        for topic in topics:
            if topic in ("*", "Allocation", "Job", "Evaluation", "Deployment", "Service"):
                self.acl.require_namespace(request, "read-job")
            if topic in ("*", "Node"):
                self.acl.require_node_read(request)
        return events.stream_response(self.state.broker, index, topics)

    # ---- nodes (command/agent/node_endpoint.go, nomad/node_endpoint.go List/GetNode) --------

    async def list_nodes(self, request: Request) -> Response:
        self.acl.require_node_read(request)
        await self.block(request)
        prefix = request.query_params.get("prefix", "")
        with_resources = request.query_params.get("resources") in _TRUE
        return self.ok([views.node_stub(n, self._node_volumes(n.id), with_resources)
                        for n in sorted(self.state.nodes.values(), key=lambda n: n.id)
                        if n.id.startswith(prefix)])

    def _node_volumes(self, node_id: str) -> list[dict[str, Any]]:
        return [v for v in self.state.volumes.values() if v["NodeID"] == node_id]

    async def get_node(self, request: Request) -> Response:
        self.acl.require_node_read(request)
        await self.block(request)
        node = self.state.nodes.get(request.path_params["node_id"])
        if node is None:
            raise NotFound("node not found")
        return self.ok(views.node_view(node, self._node_volumes(node.id)))

    # ---- jobs ----------------------------------------------------------------------------

    async def register(self, request: Request) -> Response:
        url_id = request.path_params.get("job_id")
        if _is_bare_job(await request.body()):
            # The most common mistake: a job object without the {"Job": ...} wrapper.
            raise refuse(request, self.state, "Job must be specified")
        body = await read_body(request, self.state, "nomad", "JobRegisterRequest")
        job = body.get("Job")
        if not job:
            raise refuse(request, self.state, "Job must be specified")
        if job.get("ID") is None:
            raise refuse(request, self.state, "Job ID hasn't been provided")
        if url_id is not None and job.get("ID") != url_id:
            raise refuse(request, self.state, "Job ID does not match name")
        self.acl.require_namespace(request, "submit-job")
        self.acl.require_host_volumes(request, job)
        errors = jobcheck.check(job, url_id)
        if errors:
            # nomad/job_endpoint.go Register returns the validation's multierror uncoded: 500.
            refuse(request, self.state, _multierror(errors))
            raise ServerError(_multierror(errors))
        return self.ok(self.cluster.register(job))

    async def validate(self, request: Request) -> Response:
        """command/agent/job_endpoint.go ValidateJobRequest -> nomad/job_endpoint.go Validate:
        validation errors are reported in a 200 JobValidateResponse, not as an HTTP error."""
        body = await read_body(request, self.state, "nomad", "JobValidateRequest")
        job = body.get("Job")
        if not job:
            raise BadRequest("Job must be specified")
        self.acl.require_namespace(request, "read-job")
        errors = jobcheck.check(job, None)
        return self.ok({"DriverConfigValidated": True, "ValidationErrors": errors or None,
                        "Error": _multierror(errors) if errors else "", "Warnings": ""})

    def _job(self, job_id: str) -> dict[str, Any]:
        job = self.state.jobs.get(job_id)
        if job is None:
            raise NotFound("job not found")
        return job

    async def get_job(self, request: Request) -> Response:
        self.acl.require_namespace(request, "read-job")
        await self.block(request)
        job = self._job(request.path_params["job_id"])
        return self.ok(views.job_view(job, self.cluster.job_status(job)))

    async def list_jobs(self, request: Request) -> Response:
        self.acl.require_namespace(request, "list-jobs")
        await self.block(request)
        prefix = request.query_params.get("prefix", "")
        meta = truthy(request, "meta")
        return self.ok([views.job_stub(j, self.cluster.job_status(j), meta)
                        for jid, j in sorted(self.state.jobs.items()) if jid.startswith(prefix)])

    async def deregister(self, request: Request) -> Response:
        self.acl.require_namespace(request, "submit-job")
        purge = _parse_bool(request, "purge")
        return self.ok(self.cluster.deregister(request.path_params["job_id"], purge))

    async def job_allocs(self, request: Request) -> Response:
        self.acl.require_namespace(request, "read-job")
        await self.block(request)
        jid = request.path_params["job_id"]
        # nomad/state/state_store.go AllocsByJob: allocations of an earlier job with this ID
        # (purged, then registered again: another CreateIndex) only with ?all=true
        job = self.state.jobs.get(jid)
        every = job is None or request.query_params.get("all") in _TRUE   # errors ignored
        return self.ok([views.alloc_stub(a, self.state) for a in self.state.job_allocs(jid)
                        if every or a.job.get("CreateIndex") == job["CreateIndex"]])

    async def job_evals(self, request: Request) -> Response:
        self.acl.require_namespace(request, "read-job")
        await self.block(request)
        jid = request.path_params["job_id"]
        return self.ok(sorted((e for e in self.state.evals.values() if e["JobID"] == jid),
                              key=lambda e: e["CreateIndex"]))

    async def list_allocs(self, request: Request) -> Response:
        # Nomad's ?prefix= matches the allocation ID, not the job.
        self.acl.require_namespace(request, "read-job")
        await self.block(request)
        prefix = request.query_params.get("prefix", "")
        with_resources = request.query_params.get("resources") in _TRUE
        return self.ok([views.alloc_stub(a, self.state, with_resources)
                        for a in self.state.allocs.values() if a.id.startswith(prefix)])

    # ---- evaluations and allocations -----------------------------------------------------

    async def get_eval(self, request: Request) -> Response:
        self.acl.require_namespace(request, "read-job")
        await self.block(request)
        ev = self.state.evals.get(request.path_params["eval_id"])
        if ev is None:
            raise NotFound("eval not found")
        return self.ok(ev)

    def _alloc(self, alloc_id: str) -> Any:
        alloc = self.state.allocs.get(alloc_id)
        if alloc is None:
            raise NotFound("alloc not found")
        return alloc

    async def get_alloc(self, request: Request) -> Response:
        self.acl.require_namespace(request, "read-job")
        await self.block(request)
        alloc = self._alloc(request.path_params["alloc_id"])
        return self.ok(views.allocation(alloc, self.state))

    async def signal(self, request: Request) -> Response:
        alloc = self._alloc(request.path_params["alloc_id"])
        body = await read_body(request, self.state, "nomad", "AllocSignalRequest")
        self.acl.require_namespace(request, "alloc-lifecycle")
        try:
            sig = parse_signal(body.get("Signal") or "SIGKILL")
        except ValueError as exc:
            raise refuse(request, self.state, str(exc)) from None
        runners = self.cluster.runners.get(alloc.id, [])
        task = body.get("Task") or ""
        chosen = [r for r in runners if not task or r.name == task]
        if not chosen:
            # client/allocrunner Signal: an uncoded error, so 500
            refuse(request, self.state, f"Failed to signal task: {task}, err: task not found")
            raise ServerError(f"Failed to signal task: {task}, err: task not found")
        if alloc.terminal or not any(r.ts["State"] == "running" for r in chosen):
            return text_response("Task not running", 500, self.headers())
        for runner in chosen:
            runner.event("Signaling", "Task being sent a signal", TaskSignal=sig.name,
                         TaskSignalReason="User requested signal")
            runner.send(sig)
        return self.ok({})

    async def logs(self, request: Request) -> Response:
        self.acl.require_namespace(request, "read-logs")
        alloc = self._alloc(request.path_params["alloc_id"])
        task = request.query_params.get("task", "")
        kind = request.query_params.get("type", "")
        if not task:
            raise BadRequest("must provide task name")
        if kind not in ("stdout", "stderr"):
            raise BadRequest("must provide valid log type (stdout, stderr)")
        if task not in alloc.task_states:
            raise NotFound(f'unknown task name "{task}"')
        if not truthy(request, "plain"):
            raise BadRequest("the double serves logs with plain=true only (no framed stream)")
        path = Path(alloc.dir) / "alloc" / "logs" / f"{task}.{kind}.0"
        data = path.read_bytes() if path.exists() else b""
        offset = int(request.query_params.get("offset", "0") or 0)
        if request.query_params.get("origin", "start") == "end":
            data = data[max(0, len(data) - offset):]
        else:
            data = data[offset:]
        return Response(data, headers=self.headers(), media_type="text/plain")


_TRUE = ("1", "t", "T", "TRUE", "true", "True")   # strconv.ParseBool


def _parse_bool(request: Request, name: str) -> bool:
    """command/agent/job_endpoint.go jobDelete: strconv.ParseBool, its error uncoded (500)."""
    raw = request.query_params.get(name, "")
    if raw == "":
        return False
    if raw in _TRUE:
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ServerError(f'Failed to parse value of "{name}" ({raw}) as a bool: strconv.ParseBool: '
                      f'parsing "{raw}": invalid syntax')


def _multierror(errors: list[str]) -> str:
    # hashicorp/go-multierror's format, as Nomad's validation errors read
    return f"{len(errors)} error{'s' if len(errors) > 1 else ''} occurred:\n" + "".join(
        f"\t* {e}\n" for e in errors) + "\n"
