"""Nomad's dynamic host volumes (1.10, plugin "mkdir") and Variables, as the double serves
them. Variable writes re-render the templates that read them."""

from __future__ import annotations

import os
import re
import shutil
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from tests.doubles import views
from tests.doubles.httputil import BadRequest, NotFound, json_response, read_body, refuse
from tests.doubles.state import NODE_ID, new_id, now_ns

if TYPE_CHECKING:
    from tests.doubles.nomad_api import NomadAPI

VAR_PATH = re.compile(r"^[a-zA-Z0-9\-_~/]{1,128}$")  # Nomad's validVariablePath


def store_routes(api: NomadAPI) -> list[tuple[str, list[str], Any]]:
    volumes, variables = Volumes(api), Variables(api)
    return [
        ("/v1/volume/host/create", ["PUT", "POST"], volumes.create),
        ("/v1/volume/host/{vol_id}", ["GET"], volumes.get),
        ("/v1/volume/host/{vol_id}/delete", ["DELETE"], volumes.delete),
        ("/v1/volumes", ["GET"], volumes.list),
        ("/v1/var/{path:path}", ["PUT"], variables.put),
        ("/v1/var/{path:path}", ["GET"], variables.get),
        ("/v1/var/{path:path}", ["DELETE"], variables.delete),
        ("/v1/vars", ["GET"], variables.list),
    ]


class Volumes:
    def __init__(self, api: NomadAPI):
        self.api, self.state = api, api.state

    async def create(self, request: Request) -> Response:
        body = await read_body(request, self.state, "nomad", "HostVolumeCreateRequest")
        spec = body.get("Volume")
        if not spec:
            raise refuse(request, self.state, "missing volume definition")
        problem = self._problem(spec)
        if problem:
            raise refuse(request, self.state, problem)
        vol = self.state.volume_by_name(spec["Name"])
        if spec.get("ID") and (vol is None or vol["ID"] != spec["ID"]):
            raise refuse(request, self.state, f'no such volume "{spec["ID"]}"')
        vol = self._update(vol, spec) if vol else self._make(spec)
        return self.api.ok({"Volume": vol, "Warnings": ""})

    def _problem(self, spec: dict[str, Any]) -> str | None:
        if not spec.get("Name"):
            return "missing name"
        if (spec.get("PluginID") or "") != "mkdir":
            # Real Nomad accepts the volume and leaves it pending forever (no client has the
            # plugin); the double says so at once.
            return (f'no node with plugin "{spec.get("PluginID") or "default"}": the double\'s '
                    f'node has only the built-in "mkdir" plugin')
        if spec.get("NodeID") not in (None, "", NODE_ID):
            return f'node "{spec["NodeID"]}" does not exist'
        if spec.get("NodePool") not in (None, "", "default"):
            return f'node pool "{spec["NodePool"]}" has no nodes'
        if spec.get("Namespace") not in (None, "", "default"):
            return f'namespace "{spec["Namespace"]}" does not exist'
        return None

    def _make(self, spec: dict[str, Any]) -> dict[str, Any]:
        vid = new_id()
        path = self.state.data_dir / "volumes" / vid
        path.mkdir(parents=True)
        os.chmod(path, 0o700)   # the mkdir plugin's default mode
        index, now = self.state.bump(), now_ns()
        vol = {"Namespace": "default", "ID": vid, "Name": spec["Name"], "PluginID": "mkdir",
               "NodePool": "default", "NodeID": NODE_ID, "Constraints": spec.get("Constraints"),
               "RequestedCapacityMinBytes": spec.get("RequestedCapacityMinBytes", 0),
               "RequestedCapacityMaxBytes": spec.get("RequestedCapacityMaxBytes", 0),
               "CapacityBytes": 0, "RequestedCapabilities": spec.get("RequestedCapabilities"),
               "Parameters": spec.get("Parameters"), "HostPath": str(path), "State": "ready",
               "CreateIndex": index, "CreateTime": now, "ModifyIndex": index,
               "ModifyTime": now, "Allocations": None}
        self.state.volumes[vid] = vol
        return vol

    def _update(self, vol: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        # Nomad's create is an upsert by name: the existing volume (same ID, path) comes back.
        for key in ("Constraints", "RequestedCapabilities", "Parameters",
                    "RequestedCapacityMinBytes", "RequestedCapacityMaxBytes"):
            if key in spec:
                vol[key] = spec[key]
        vol["ModifyIndex"], vol["ModifyTime"] = self.state.bump(), now_ns()
        return vol

    def _vol(self, vol_id: str) -> dict[str, Any]:
        vol = self.state.volumes.get(vol_id)
        if vol is None:
            raise NotFound("volume not found")
        return vol

    def _users(self, vol: dict[str, Any]) -> list[Any]:
        return [a for a in self.state.live_allocs()
                if any(v["ID"] == vol["ID"] for v in a.volumes.values())]

    async def get(self, request: Request) -> Response:
        await self.api.block(request)
        vol = dict(self._vol(request.path_params["vol_id"]))
        vol["Allocations"] = [views.alloc_stub(a) for a in self._users(vol)] or None
        return self.api.ok(vol)

    async def delete(self, request: Request) -> Response:
        vol = self._vol(request.path_params["vol_id"])
        users = self._users(vol)
        if users:
            raise refuse(request, self.state, f'volume "{vol["ID"]}" in use by allocations: '
                                              f'{[a.id for a in users]}')
        shutil.rmtree(vol["HostPath"], ignore_errors=True)
        del self.state.volumes[vol["ID"]]
        self.state.bump()
        return self.api.ok({"Index": self.state.index})

    async def list(self, request: Request) -> Response:
        if request.query_params.get("type") != "host":
            raise BadRequest("the double lists host volumes only (type=host)")
        await self.api.block(request)
        prefix = request.query_params.get("prefix", "")
        return self.api.ok([views.volume_stub(v) for v in self.state.volumes.values()
                            if v["ID"].startswith(prefix) or v["Name"].startswith(prefix)])


class Variables:
    def __init__(self, api: NomadAPI):
        self.api, self.state = api, api.state

    def _path(self, request: Request) -> str:
        path = request.path_params["path"]
        if not VAR_PATH.match(path):
            raise refuse(request, self.state, "invalid path")
        if path.startswith("nomad/") and not (path == "nomad/jobs"
                                              or path.startswith("nomad/jobs/")):
            raise refuse(request, self.state, '"nomad" is a reserved top-level directory path')
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
        body = await read_body(request, self.state, "nomad", "Variable")
        if body.get("Path") not in (None, "", path):
            raise refuse(request, self.state, "variable path in body does not match URL")
        if body.get("Namespace") not in (None, "", "default"):
            raise refuse(request, self.state, "the double has only the default namespace")
        if not body.get("Items"):
            raise refuse(request, self.state, "empty variables are invalid")
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
        await self.api.block(request)
        var = self.state.variables.get(self._path(request))
        if var is None:
            raise NotFound("variable not found")
        return self.api.ok(var)

    async def delete(self, request: Request) -> Response:
        path = self._path(request)
        conflict = self._conflict(path, self._cas(request))
        if conflict is not None:
            return conflict
        if self.state.variables.pop(path, None) is not None:
            self.state.bump()
        return Response(b"", headers=self.api.headers())

    async def list(self, request: Request) -> Response:
        await self.api.block(request)
        prefix = request.query_params.get("prefix", "")
        return self.api.ok([views.variable_meta(v) for p, v in sorted(self.state.variables.items())
                            if p.startswith(prefix)])

