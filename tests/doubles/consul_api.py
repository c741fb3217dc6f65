"""The Consul HTTP API of the double (read side): what Nomad registered, with check statuses
the double keeps current. Every answer carries X-Consul-Index (py-consul needs it)."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from tests.doubles.httputil import BadRequest, blocking_params, json_response, routes, text_response, truthy
from tests.doubles.state import DATACENTER, NODE_ID, NODE_NAME, ConsulService, State


class ConsulAPI:
    def __init__(self, state: State):
        self.state = state

    def headers(self) -> dict[str, str]:
        return {"X-Consul-Index": str(self.state.consul_index),
                "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0",
                "X-Consul-Effective-Consistency": "leader"}

    def ok(self, body: Any, index: int | None = None) -> Response:
        headers = self.headers()
        if index is not None:
            headers["X-Consul-Index"] = str(index)
        return json_response(body, headers)

    async def block(self, request: Request, service: str | None = None) -> None:
        index, wait = blocking_params(request)
        if index is not None:
            await self.state.wait_past(index, wait, consul=True, service=service)

    def app(self) -> Starlette:
        table = [
            ("/v1/status/leader", ["GET"], self.leader),
            ("/v1/health/service/{name}", ["GET"], self.health_service),
            ("/v1/health/checks/{name}", ["GET"], self.health_checks),
            ("/v1/health/state/{state}", ["GET"], self.health_state),
            ("/v1/catalog/services", ["GET"], self.catalog_services),
            ("/v1/catalog/service/{name}", ["GET"], self.catalog_service),
            ("/v1/agent/services", ["GET"], self.agent_services),
        ]
        return Starlette(routes=routes(self.state, "consul", table),
                         exception_handlers={BadRequest: self._bad_request})

    async def _bad_request(self, request: Request, exc: Exception) -> Response:
        return text_response(str(exc), 400, self.headers())

    # ---- shapes --------------------------------------------------------------------------

    def node(self) -> dict[str, Any]:
        return {"ID": NODE_ID, "Node": NODE_NAME, "Address": "127.0.0.1",
                "Datacenter": DATACENTER,
                "TaggedAddresses": {"lan": "127.0.0.1", "wan": "127.0.0.1"},
                "Meta": {"consul-network-segment": ""}, "CreateIndex": 1, "ModifyIndex": 1}

    def service(self, svc: ConsulService) -> dict[str, Any]:
        return {"Kind": "", "ID": svc.id, "Service": svc.name, "Tags": list(svc.tags),
                "Meta": dict(svc.meta), "Port": svc.port, "Address": "127.0.0.1",
                "TaggedAddresses": None, "Weights": {"Passing": 1, "Warning": 1},
                "EnableTagOverride": False, "CreateIndex": svc.create_index,
                "ModifyIndex": svc.modify_index, "Namespace": "default", "Datacenter": DATACENTER}

    def serf_health(self) -> dict[str, Any]:
        # Consul lists the node's own agent check with every service entry.
        return {"Node": NODE_NAME, "CheckID": "serfHealth", "Name": "Serf Health Status",
                "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
                "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
                "Namespace": "default", "Definition": {}, "CreateIndex": 1, "ModifyIndex": 1}

    def _named(self, name: str) -> list[ConsulService]:
        return sorted((s for s in self.state.services.values() if s.name == name),
                      key=lambda s: s.id)

    # ---- handlers ------------------------------------------------------------------------

    async def leader(self, request: Request) -> Response:
        return self.ok("127.0.0.1:8300")

    async def health_service(self, request: Request) -> Response:
        # agent/health_endpoint.go -> state ServiceNodes/CheckServiceNodes: the index is the
        # service's own (maxIndexForService), so a blocking query on one engine's service
        # does not return on every other engine's check change.
        name = request.path_params["name"]
        await self.block(request, service=name)
        entries = []
        tag = request.query_params.get("tag")
        for svc in self._named(request.path_params["name"]):
            checks = [self.serf_health(), *(dict(c) for c in svc.checks.values())]
            if truthy(request, "passing") and any(c["Status"] != "passing" for c in checks):
                continue
            if tag and tag not in svc.tags:
                continue
            entries.append({"Node": self.node(), "Service": self.service(svc), "Checks": checks})
        return self.ok(entries, index=self.state.service_index.get(name, 1))

    async def health_checks(self, request: Request) -> Response:
        await self.block(request)
        return self.ok([dict(c) for svc in self._named(request.path_params["name"])
                        for c in svc.checks.values()])

    async def health_state(self, request: Request) -> Response:
        await self.block(request)
        wanted = request.path_params["state"]
        if wanted not in ("any", "passing", "warning", "critical"):
            raise BadRequest(f"Invalid state {wanted!r}")  # Consul's own wording differs; 400 alike
        checks = [self.serf_health(), *(dict(c) for s in self.state.services.values()
                                        for c in s.checks.values())]
        return self.ok([c for c in checks if wanted == "any" or c["Status"] == wanted])

    async def catalog_services(self, request: Request) -> Response:
        await self.block(request)
        names: dict[str, set[str]] = {"consul": set()}
        for svc in self.state.services.values():
            names.setdefault(svc.name, set()).update(svc.tags)
        return self.ok({name: sorted(tags) for name, tags in sorted(names.items())})

    async def catalog_service(self, request: Request) -> Response:
        await self.block(request)
        node = self.node()
        return self.ok([{"ID": node["ID"], "Node": node["Node"], "Address": node["Address"],
                         "Datacenter": DATACENTER, "TaggedAddresses": node["TaggedAddresses"],
                         "NodeMeta": node["Meta"], "ServiceID": s.id, "ServiceName": s.name,
                         "ServiceAddress": "127.0.0.1", "ServiceTags": list(s.tags),
                         "ServiceMeta": dict(s.meta), "ServicePort": s.port,
                         "ServiceEnableTagOverride": False,
                         "ServiceWeights": {"Passing": 1, "Warning": 1},
                         "CreateIndex": s.create_index, "ModifyIndex": s.modify_index}
                        for s in self._named(request.path_params["name"])])

    async def agent_services(self, request: Request) -> Response:
        return self.ok({s.id: self.service(s) for s in self.state.services.values()})
