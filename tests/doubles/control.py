"""The test-facing control API: faults, node loss and return, ACLs, rejections, request
counts, a state dump.
Also the listeners: "down" closes a port (connection refused) and "up" reopens the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.doubles.acl import ACL
from tests.doubles.scheduler import Cluster
from tests.doubles.state import Faults

FAULT_TYPES = {name: type(value) for name, value in Faults().as_dict().items()}
FAULT_TYPES["fingerprint_s"] = float   # or null: the client's node update timing
FAULT_TYPES["nomad_retry_s"] = float   # or null: the client's nomad_retry schedule


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the double (several servers share one
    process, and the double must stop its tasks before exiting)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Listener:
    """One port served by one uvicorn server, which can go down and come back."""

    def __init__(self, app: Any, port: int):
        self.app = app
        self.sock = _bind(port)
        self.port: int = self.sock.getsockname()[1]   # fixed from now on, across downs
        self.server: QuietServer | None = None
        self.task: asyncio.Task[None] | None = None

    def up(self) -> None:
        if self.server is not None:
            return
        if self.sock is None:
            self.sock = _bind(self.port)
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1, access_log=False)
        self.server = QuietServer(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve([self.sock]))

    async def down(self) -> None:
        server, task = self.server, self.task
        if server is None or task is None:
            return
        self.server = self.task = None
        server.should_exit = server.force_exit = True
        for conn in list(server.server_state.connections):
            if conn.transport is not None:
                conn.transport.abort()   # no half-answers: the port is simply gone
        await task
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Control:
    def __init__(self, cluster: Cluster, nomad: Listener, consul: Listener, acl: ACL):
        self.cluster, self.state = cluster, cluster.state
        self.nomad, self.consul = nomad, consul
        self.acl = acl

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/faults", self.get_faults, methods=["GET"]),
            Route("/faults", self.set_faults, methods=["POST"]),
            Route("/node-lost", self.node_lost, methods=["POST"]),
            Route("/node-up", self.node_up, methods=["POST"]),
            Route("/node-resources", self.node_resources, methods=["POST"]),
            Route("/node-drain", self.node_drain, methods=["POST"]),
            Route("/event-stream/drop", self.drop_streams, methods=["POST"]),
            Route("/acl", self.set_acl, methods=["POST"]),
            Route("/rejections", self.rejections, methods=["GET"]),
            Route("/rejections", self.clear_rejections, methods=["DELETE"]),
            Route("/requests", self.requests, methods=["GET"]),
            Route("/state", self.summary, methods=["GET"]),
        ])

    @staticmethod
    def _json(body: Any, status: int = 200) -> Response:
        return Response(json.dumps(body), status_code=status, media_type="application/json")

    async def get_faults(self, request: Request) -> Response:
        return self._json(self.state.faults.as_dict())

    async def set_faults(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            return self._json({"error": f"bad JSON: {exc}"}, 400)
        problem = _fault_problem(body)
        if problem:
            return self._json({"error": problem}, 400)
        for name, value in body.items():
            setattr(self.state.faults, name,
                    float(value) if FAULT_TYPES[name] is float and value is not None else value)
        await self._apply_down(self.nomad, self.state.faults.nomad_down)
        await self._apply_down(self.consul, self.state.faults.consul_down)
        return self._json(self.state.faults.as_dict())

    @staticmethod
    async def _apply_down(listener: Listener, down: bool) -> None:
        if down:
            await listener.down()
        else:
            listener.up()

    async def _nodes(self, request: Request) -> list[str] | Response:
        """The node named in the body ({"node": id}); without one, every node running a live
        allocation (all nodes when none does)."""
        body = json.loads(await request.body() or b"{}")
        if body.get("node"):
            if body["node"] not in self.state.nodes:
                return self._json({"error": f"no node {body['node']!r}"}, 400)
            return [body["node"]]
        busy = sorted({a.node_id for a in self.state.live_allocs()})
        return busy or sorted(self.state.nodes)

    async def node_lost(self, request: Request) -> Response:
        nodes = await self._nodes(request)
        if isinstance(nodes, Response):
            return nodes
        return self._json({"lost": [a for n in nodes for a in self.cluster.node_lost(n)],
                           "nodes": nodes})

    async def node_up(self, request: Request) -> Response:
        nodes = await self._nodes(request)
        if isinstance(nodes, Response):
            return nodes
        for node in nodes:
            self.cluster.node_up(node)
        return self._json({"nodes": nodes})

    async def node_resources(self, request: Request) -> Response:
        """{"node": id (default: every node), "cpu": MHz, "memory_mb": MB, "node_class": str}:
        the node's size and class."""
        nodes = await self._nodes(request)
        if isinstance(nodes, Response):
            return nodes
        body = json.loads(await request.body() or b"{}")
        sizes = {k: body[k] for k in ("cpu", "memory_mb") if k in body}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in sizes.values()):
            return self._json({"error": "cpu and memory_mb must be integers >= 0"}, 400)
        if not isinstance(body.get("node_class", ""), str):
            return self._json({"error": "node_class must be a string"}, 400)
        if "node_class" in body:
            sizes["node_class"] = body["node_class"]
        for node_id in nodes if body.get("node") else sorted(self.state.nodes):
            node = self.state.nodes[node_id]
            for key, value in sizes.items():
                setattr(node, key, value)
            node.modify_index = self.state.bump()
        return self._json(self.state.summary()["node_resources"])

    async def node_drain(self, request: Request) -> Response:
        """{"node": id, "enable": bool}: a drain strategy set (the node ineligible) or not."""
        nodes = await self._nodes(request)
        if isinstance(nodes, Response):
            return nodes
        enable = bool(json.loads(await request.body() or b"{}").get("enable", True))
        for node_id in nodes:
            node = self.state.nodes[node_id]
            # nomad/state UpdateNodeDrain: a drain makes the node ineligible
            node.drain, node.eligibility = enable, "ineligible" if enable else "eligible"
            node.modify_index = self.state.bump()
        return self._json({"nodes": nodes})

    async def drop_streams(self, request: Request) -> Response:
        """Cut every open event stream (a server restart would): clients must resume."""
        self.state.broker.drop_all()
        return self._json({"index": self.state.index})

    async def set_acl(self, request: Request) -> Response:
        """{"enabled": bool, "tokens": {secret: {"namespace": [caps], "variables":
        {path glob: [caps]}, "node": "read"}}}"""
        body = json.loads(await request.body() or b"{}")
        self.acl.configure(bool(body.get("enabled")), body.get("tokens") or {})
        return self._json({"enabled": self.acl.enabled, "tokens": sorted(self.acl.tokens)})

    async def rejections(self, request: Request) -> Response:
        return self._json(self.state.rejections)

    async def clear_rejections(self, request: Request) -> Response:
        self.state.rejections.clear()
        return self._json([])

    async def requests(self, request: Request) -> Response:
        return self._json([{"api": a, "method": m, "route": r, "count": n}
                           for (a, m, r), n in sorted(self.state.requests.items())])

    async def summary(self, request: Request) -> Response:
        return self._json(self.state.summary())


def _fault_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for name, value in body.items():
        kind = FAULT_TYPES.get(name)
        if kind is None:
            return f"unknown fault {name!r} (known: {', '.join(sorted(FAULT_TYPES))})"
        if kind is bool and not isinstance(value, bool):
            return f"{name} must be true or false"
        if name in ("fingerprint_s", "nomad_retry_s") and value is None:
            continue
        if kind is list and (not isinstance(value, list)
                             or not all(isinstance(v, str) for v in value)):
            return f"{name} must be a list of task names"
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or value < 0):
            return f"{name} must be a number >= 0"
    return None
