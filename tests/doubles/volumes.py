"""Nomad's dynamic host volumes (1.10), as the double serves them.

Follows, at v1.10.5:
- command/agent/host_volume_endpoint.go `HostVolumeSpecificRequest`: PUT|POST
  /v1/volume/host/create, GET and DELETE /v1/volume/host/<id> (the path's first token is the
  ID, so the older `/v1/volume/host/<id>/delete` reaches the same delete);
- nomad/host_volume_endpoint.go `Create`, `placeHostVolume`, `createVolume`, `Delete`: create
  without an ID makes a new volume; without a NodeID the first node in node-ID order that has
  the plugin and no volume of that name yet is taken (ready or not: a down node fails the
  client RPC); every refusal there is an uncoded error, so HTTP 500 (command/agent/http.go
  `wrap`);
- client/hostvolumemanager/host_volume_plugin.go `HostVolumePluginMkdir.Create` and
  `decodeMkdirParams`: Parameters uid, gid, mode (octal); anything else is an error; the
  directory is owned by the client's user (root) unless uid/gid are given, mode 0700;
- the volume is `pending` until its client re-registers the node, then `ready`
  (nomad/structs/host_volumes.go HostVolumeStatePending/Ready; nomad/state
  state_store_host_volumes.go sets it from the node's HostVolumes). The client batches node
  updates (client/client.go watchNodeUpdates): the first change arms a timer of
  `retryIntv(nodeUpdateRetryIntv)`, 5 s plus a random stagger up to 5 s (helper.RandomStagger),
  1 s on a `-dev` agent (devModeRetryIntv); changes until it fires ride on the same update.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from tests.doubles import views
from tests.doubles.httputil import BadRequest, NotFound, ServerError, read_body, refuse
from tests.doubles.state import new_id, now_ns

if TYPE_CHECKING:
    from tests.doubles.nomad_api import NomadAPI

CLIENT_UID = 0  # the Nomad client runs as root: an unset uid/gid leaves root's
UMASK = 0o022   # the agent's umask, applied by os.MkdirAll
MKDIR_PARAMS = ("uid", "gid", "mode")
NODE_UPDATE_S = 5.0      # client/client.go nodeUpdateRetryIntv
DEV_NODE_UPDATE_S = 1.0  # client/client.go devModeRetryIntv


def volume_routes(api: NomadAPI) -> list[tuple[str, list[str], Any]]:
    volumes = Volumes(api)
    return [
        ("/v1/volume/host/create", ["PUT", "POST"], volumes.create),
        ("/v1/volume/host/{vol_id}", ["GET"], volumes.get),
        ("/v1/volume/host/{vol_id}", ["DELETE"], volumes.delete),
        ("/v1/volume/host/{vol_id}/delete", ["DELETE"], volumes.delete),
        ("/v1/volumes", ["GET"], volumes.list),
    ]


def mkdir_params(params: dict[str, str] | None) -> dict[str, int]:
    """decodeMkdirParams: uid/gid default -1 (unchanged: the client's user), mode 0700."""
    out = {"uid": -1, "gid": -1, "mode": 0o700}
    for key, value in (params or {}).items():
        if key not in MKDIR_PARAMS:
            raise ValueError(f'unknown mkdir parameter: "{key}"')
        try:
            out[key] = int(value, 8) if key == "mode" else int(value)
        except ValueError:
            raise ValueError(f'invalid value for "{key}": strconv.ParseInt: parsing '
                             f'"{value}": invalid syntax') from None
    return out


def owner_and_mode(vol: dict[str, Any]) -> tuple[int, int, int]:
    """(uid, gid, mode) the real directory would have on a client running as root."""
    params = mkdir_params(vol.get("Parameters"))
    uid = CLIENT_UID if params["uid"] < 0 else params["uid"]
    gid = CLIENT_UID if params["gid"] < 0 else params["gid"]
    return uid, gid, params["mode"] & ~UMASK


class Volumes:
    def __init__(self, api: NomadAPI):
        self.api, self.state = api, api.state
        self.updating: set[str] = set()   # nodes with a node update armed

    async def create(self, request: Request) -> Response:
        body = await read_body(request, self.state, "nomad", "HostVolumeCreateRequest")
        spec = body.get("Volume")
        if not spec:
            raise ServerError("missing volume definition")
        self.api.acl.require_namespace(request, "host-volume-create")
        if spec.get("Namespace") not in (None, "", "default"):
            raise ServerError(f'volume validation failed: no such namespace "{spec["Namespace"]}"')
        if spec.get("ID"):
            vol = self.state.volumes.get(spec["ID"])
            if vol is None:
                raise ServerError(f'cannot update volume "{spec["ID"]}": volume does not exist')
            return self.api.ok({"Volume": self._update(vol, spec), "Warnings": ""})
        if not spec.get("Name"):
            raise refuse(request, self.state, "volume validation failed: missing name")
        node = self._place(spec)
        vol = self._make(spec, node)
        return self.api.ok({"Volume": vol, "Warnings": "", "Index": vol["CreateIndex"]})

    def _place(self, spec: dict[str, Any]) -> str:
        """placeHostVolume: the node the volume goes on, or a 500 saying why none."""
        plugin = spec.get("PluginID") or "default"   # CanonicalizeForCreate's default
        nodes = self.state.nodes
        if spec.get("NodeID"):
            node = nodes.get(spec["NodeID"])
            if node is None:
                raise ServerError(f'validating volume "{spec["Name"]}" against state failed: '
                                  f'node "{spec["NodeID"]}" does not exist')
            if spec.get("NodePool") not in (None, "", node.pool):
                raise ServerError(f'validating volume "{spec["Name"]}" against state failed: '
                                  f'node ID "{node.id}" is not in pool "{spec["NodePool"]}"')
            chosen = node
        else:
            existing = infeasible = 0
            chosen = None
            for node in sorted(nodes.values(), key=lambda n: n.id):
                if spec.get("NodePool") not in (None, "", node.pool):
                    continue
                if any(v["NodeID"] == node.id for v in self.state.volumes_named(spec["Name"])):
                    existing += 1
                    continue
                if plugin != "mkdir":   # the only plugin the double's clients fingerprint
                    infeasible += 1
                    continue
                chosen = node
                break
            if chosen is None:
                raise ServerError(
                    f'could not place volume "{spec["Name"]}": no node meets constraints: '
                    f"{existing} nodes had existing volume, 0 nodes filtered by node pool "
                    f"governance, {infeasible} nodes were infeasible")
        if plugin != "mkdir":
            raise ServerError(f'could not place volume "{spec["Name"]}": '
                              f'no such plugin "{plugin}" on node {chosen.id}')
        if chosen.status != "ready":
            # the client RPC (ClientHostVolume.Create) cannot reach a down node
            raise ServerError(f"rpc error: No path to node {chosen.id}")
        if any(o["Name"] == spec["Name"] for o in chosen.orphans.values()):
            # client/hostvolumemanager host_volumes.go Create: volLocker holds the name for
            # the orphan's ID (NodeHasHostVolume only asked the server's state)
            raise ServerError("rpc error: volume name already exists on this node")
        return chosen.id

    def _make(self, spec: dict[str, Any], node_id: str) -> dict[str, Any]:
        try:
            mkdir_params(spec.get("Parameters"))
        except ValueError as exc:
            raise ServerError(f"error with parameters: {exc}") from None
        vid = new_id()
        path = self.state.data_dir / "volumes" / vid
        path.mkdir(parents=True)
        os.chmod(path, 0o700)   # the double runs as one user: the owner the volume would
        # have is kept in Parameters and checked by the docker emulation (drivers.py)
        index, now = self.state.bump(), now_ns()
        node = self.state.nodes[node_id]
        vol = {"Namespace": "default", "ID": vid, "Name": spec["Name"], "PluginID": "mkdir",
               "NodePool": node.pool, "NodeID": node_id, "Constraints": spec.get("Constraints"),
               "RequestedCapacityMinBytes": spec.get("RequestedCapacityMinBytes", 0),
               "RequestedCapacityMaxBytes": spec.get("RequestedCapacityMaxBytes", 0),
               "CapacityBytes": 0, "RequestedCapabilities": spec.get("RequestedCapabilities"),
               "Parameters": spec.get("Parameters"), "HostPath": str(path), "State": "pending",
               "CreateIndex": index, "CreateTime": now, "ModifyIndex": index,
               "ModifyTime": now, "Allocations": None}
        self.state.volumes[vid] = vol
        if node_id not in self.updating:   # else it rides on the update already armed
            self.updating.add(node_id)
            self.api.cluster.spawn(self._node_update(node_id))
        return dict(vol)

    def _update_delay(self) -> float:
        fixed = self.state.faults.fingerprint_s
        if fixed is not None:
            return fixed
        if self.state.timing == "dev":
            return DEV_NODE_UPDATE_S
        return NODE_UPDATE_S + random.uniform(0, NODE_UPDATE_S)

    async def _node_update(self, node_id: str) -> None:
        """The client re-registers its node: every volume pending on it becomes ready."""
        try:
            await asyncio.sleep(self._update_delay())
        finally:
            self.updating.discard(node_id)
        if self.state.nodes[node_id].status != "ready":
            return
        pending = [v for v in self.state.volumes.values()
                   if v["NodeID"] == node_id and v["State"] == "pending"]
        if pending:
            index, now = self.state.bump(), now_ns()
            for vol in pending:
                vol.update(State="ready", ModifyIndex=index, ModifyTime=now)
            self.api.cluster.unblock()

    def _update(self, vol: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        # validateVolumeUpdate: an update by ID may change capabilities and constraints.
        for key in ("Constraints", "RequestedCapabilities",
                    "RequestedCapacityMinBytes", "RequestedCapacityMaxBytes"):
            if key in spec:
                vol[key] = spec[key]
        vol["ModifyIndex"], vol["ModifyTime"] = self.state.bump(), now_ns()
        return dict(vol)

    def _users(self, vol: dict[str, Any]) -> list[Any]:
        return [a for a in self.state.live_allocs()
                if any(v["ID"] == vol["ID"] for v in a.volumes.values())]

    async def get(self, request: Request) -> Response:
        self.api.acl.require_namespace(request, "host-volume-read")
        await self.api.block(request)
        vol = self.state.volumes.get(request.path_params["vol_id"])
        if vol is None:
            raise NotFound("volume not found")
        out = dict(vol)
        out["Allocations"] = [views.alloc_stub(a, self.state) for a in self._users(vol)] or None
        return self.api.ok(out)

    async def delete(self, request: Request) -> Response:
        self.api.acl.require_namespace(request, "host-volume-delete")
        vid = request.path_params["vol_id"]
        force = request.query_params.get("force", "")
        if force not in ("", "true", "false", "1", "0"):
            raise BadRequest("invalid force value")
        vol = self.state.volumes.get(vid)
        if vol is None:
            raise ServerError(f"no such volume: {vid}")
        users = self._users(vol)
        if users:
            raise ServerError(f"volume {vid} in use by allocations: {[a.id for a in users]}")
        if self.state.nodes[vol["NodeID"]].status != "ready" and force not in ("true", "1"):
            raise ServerError("volume cannot be removed from unknown node without force=true")
        node = self.state.nodes[vol["NodeID"]]
        if node.status == "ready":   # ClientHostVolume.Delete: the plugin removes it
            shutil.rmtree(vol["HostPath"], ignore_errors=True)
        else:   # forced: only the raft delete; the node keeps it (state.Node.orphans)
            node.orphans[vid] = dict(vol, State="ready")
        del self.state.volumes[vid]
        return self.api.ok({"Index": self.state.bump()})

    async def list(self, request: Request) -> Response:
        if request.query_params.get("type") != "host":
            raise BadRequest("the double lists host volumes only (type=host)")
        self.api.acl.require_namespace(request, "host-volume-read")
        await self.api.block(request)
        prefix = request.query_params.get("prefix", "")
        node = request.query_params.get("node_id", "")
        return self.api.ok([views.volume_stub(v) for v in self.state.volumes.values()
                            if (v["ID"].startswith(prefix) or v["Name"].startswith(prefix))
                            and (not node or v["NodeID"] == node)])
