"""Nomad's Variables as the double serves them (host volumes: volumes.py). Variable writes
re-render the templates that read them.

Follows command/agent/variable_endpoint.go (`variableUpsert`, `variableDelete`: a delete
answers 204 No Content; a CAS conflict 409 with the current variable) and
nomad/variables_endpoint.go (`Apply`, `Read`, `List`; ACL capabilities per path: write,
destroy, read, and list, which filters the listing rather than refusing it).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from tests.doubles import views
from tests.doubles.httputil import BadRequest, NotFound, json_response, read_body, refuse
from tests.doubles.state import now_ns
from tests.doubles.volumes import volume_routes

if TYPE_CHECKING:
    from tests.doubles.nomad_api import NomadAPI

VAR_PATH = re.compile(r"^[a-zA-Z0-9\-_~/]{1,128}$")  # Nomad's validVariablePath


def store_routes(api: NomadAPI) -> list[tuple[str, list[str], Any]]:
    variables = Variables(api)
    return [
        *volume_routes(api),
        ("/v1/var/{path:path}", ["PUT"], variables.put),
        ("/v1/var/{path:path}", ["GET"], variables.get),
        ("/v1/var/{path:path}", ["DELETE"], variables.delete),
        ("/v1/vars", ["GET"], variables.list),
    ]


MAX_SIZE = 65536   # nomad/structs/variables.go maxVariableSize


def path_problem(path: str) -> str | None:
    """nomad/structs/variables.go ValidatePath: any depth; under `nomad/` only `nomad/jobs`
    and below, and `nomad/job-templates/<name>`."""
    if not VAR_PATH.match(path):
        return f"invalid path {json.dumps(path)}"
    parts = path.split("/")
    if parts[0] != "nomad":
        return None
    if len(parts) == 1:
        return ('"nomad" is a reserved top-level directory path, but you may write variables '
                'to "nomad/jobs", "nomad/job-templates", or below')
    if parts[1] == "jobs" or (parts[1] == "job-templates" and len(parts) == 3):
        return None
    if parts[1] == "job-templates":
        return ('"nomad/job-templates" is a reserved directory path, but you may write '
                'variables at the level below it, for example, '
                '"nomad/job-templates/template-name"')
    return ('only paths at "nomad/jobs" or "nomad/job-templates" and below are valid paths '
            'under the top-level "nomad" directory')


class Variables:
    def __init__(self, api: NomadAPI):
        self.api, self.state = api, api.state

    def _path(self, request: Request) -> str:
        path = request.path_params["path"]
        problem = path_problem(path)
        if problem:
            raise refuse(request, self.state, problem)
        return path

    def _cas(self, request: Request) -> int | None:
        raw = request.query_params.get("cas")
        if raw is None:
            return None
        if not raw.isdigit():
            raise BadRequest(f"failed to parse cas value {raw!r}")
        return int(raw)

    def _conflict(self, path: str, cas: int | None) -> Response | None:
        if cas is None:
            return None
        current = self.state.variables.get(path)
        if (current["ModifyIndex"] if current else 0) == cas:
            return None
        return json_response(current, self.api.headers(), status=409)

    async def put(self, request: Request) -> Response:
        path = self._path(request)
        self.api.acl.require_variable(request, path, "write")
        body = await read_body(request, self.state, "nomad", "Variable")
        # command/agent/variable_endpoint.go variableUpsert: the URL's path is the one written,
        # whatever the body says
        body["Path"] = path
        if body.get("Namespace") not in (None, "", "default"):
            raise refuse(request, self.state, "the double has only the default namespace")
        # nomad/structs/variables.go VariableDecrypted.Validate (coded 400 by Apply): items are
        # required, any string value (empty too), 64 KiB of keys and values in all
        if not body.get("Items"):
            raise refuse(request, self.state, "empty variables are invalid")
        if sum(len(k.encode()) + len(v.encode()) for k, v in body["Items"].items()) > MAX_SIZE:
            raise refuse(request, self.state, "variables are limited to 64KiB in total size")
        conflict = self._conflict(path, self._cas(request))
        if conflict is not None:
            return conflict
        old = self.state.variables.get(path)
        index, now = self.state.bump(), now_ns()
        var = {"Namespace": "default", "Path": path,
               "CreateIndex": old["CreateIndex"] if old else index,
               "ModifyIndex": index, "CreateTime": old["CreateTime"] if old else now,
               "ModifyTime": now, "Items": dict(body["Items"])}
        self.state.variables[path] = var
        if old is None or old["Items"] != var["Items"]:
            await self.api.cluster.variables_changed(path)
        return self.api.ok(var)

    async def get(self, request: Request) -> Response:
        path = self._path(request)
        self.api.acl.require_variable(request, path, "read")
        await self.api.block(request)
        var = self.state.variables.get(path)
        if var is None:
            raise NotFound("variable not found")
        return self.api.ok(var)

    async def delete(self, request: Request) -> Response:
        path = self._path(request)
        self.api.acl.require_variable(request, path, "destroy")
        conflict = self._conflict(path, self._cas(request))
        if conflict is not None:
            return conflict
        if self.state.variables.pop(path, None) is not None:
            self.state.bump()
        return Response(status_code=204, headers=self.api.headers())

    async def list(self, request: Request) -> Response:
        await self.api.block(request)
        prefix = request.query_params.get("prefix", "")
        allowed = self.api.acl.variable_filter(request)
        return self.api.ok([views.variable_meta(v) for p, v in sorted(self.state.variables.items())
                            if p.startswith(prefix) and allowed(p)])

