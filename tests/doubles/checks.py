"""The Consul side of Nomad's service registration: services of running allocations appear in
the catalog, and their http/tcp checks are really run by the double (as the Consul agent
would), so a stopped or dead engine turns critical.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any

from tests.doubles import templates
from tests.doubles.state import NODE_NAME, Alloc, ConsulService, State

SECOND = 1_000_000_000
OUTPUT_MAX = 4096  # Consul truncates check output too
USER_AGENT = "Consul Health Check"  # agent/checks/check.go UserAgent


def _go_duration(ns: int) -> str:
    return f"{ns / SECOND:g}s" if ns % 1_000_000 == 0 and ns >= SECOND else f"{ns // 1_000_000}ms"


class ServiceManager:
    def __init__(self, state: State):
        self.state = state
        self.loops: dict[str, asyncio.Task[None]] = {}  # CheckID -> its loop
        self.started: dict[str, float] = {}             # alloc id -> monotonic task start

    async def close(self) -> None:
        for loop in self.loops.values():
            loop.cancel()

    # ---- registration --------------------------------------------------------------------

    async def task_started(self, alloc: Alloc, task: dict[str, Any]) -> None:
        self.started[alloc.id] = time.monotonic()
        group = _group(alloc)
        if group.get("Services") and not any(s.alloc_id == alloc.id and "-group-" in s.id
                                             for s in self.state.services.values()):
            for svc in group["Services"]:
                self._register(alloc, svc, f"group-{alloc.group}", task)
        for svc in task.get("Services") or []:
            self._register(alloc, svc, task["Name"], task)

    async def task_stopped(self, alloc: Alloc, task: dict[str, Any]) -> None:
        # Task services live with their task; group services with the allocation.
        prefix = f"_nomad-task-{alloc.id}-{task['Name']}-"
        for sid in [s for s in self.state.services if s.startswith(prefix)]:
            self._deregister(sid)

    def deregister_alloc(self, alloc: Alloc) -> None:
        for sid in [s.id for s in self.state.services.values() if s.alloc_id == alloc.id]:
            self._deregister(sid)

    def _register(self, alloc: Alloc, svc: dict[str, Any], owner: str,
                  task: dict[str, Any]) -> None:
        if (svc.get("Provider") or "consul") != "consul":
            return  # Nomad-native services are not in Consul
        env = templates.task_env(alloc, task, {"alloc": "", "local": "", "secrets": ""})
        meta = {k[len("NOMAD_META_"):]: v for k, v in env.items() if k.startswith("NOMAD_META_")}
        name = templates.interpolate(svc.get("Name") or "", env, meta)
        label = svc.get("PortLabel") or ""
        sid = f"_nomad-task-{alloc.id}-{owner}-{name}-{label}"
        index = self.state.bump_consul(name)
        service = ConsulService(
            id=sid, name=name,
            tags=[templates.interpolate(t, env, meta) for t in svc.get("Tags") or []],
            # command/agent/consul/service_client.go serviceRegs: the service's meta, then
            # "external-source": "nomad", which marks it as Nomad's to other Consul users
            meta={**{k: templates.interpolate(v, env, meta)
                     for k, v in (svc.get("Meta") or {}).items()},
                  "external-source": "nomad"},
            port=alloc.ports.get(label, 0), alloc_id=alloc.id, checks={},
            create_index=index, modify_index=index)
        for check in svc.get("Checks") or []:
            self._add_check(service, check, alloc)
        self.state.services[sid] = service

    def _add_check(self, service: ConsulService, check: dict[str, Any], alloc: Alloc) -> None:
        check_id = "_nomad-check-" + hashlib.sha1(
            f"{service.id}/{check.get('Name')}".encode()).hexdigest()
        kind = check.get("Type") or ""
        service.checks[check_id] = {
            "Node": NODE_NAME, "CheckID": check_id, "Name": check.get("Name") or "",
            "Status": check.get("InitialStatus") or "critical", "Notes": check.get("Notes") or "",
            "Output": "", "ServiceID": service.id, "ServiceName": service.name,
            "ServiceTags": list(service.tags), "Type": kind, "Namespace": "default",
            "Interval": _go_duration(check.get("Interval") or 10 * SECOND),
            "Timeout": _go_duration(check.get("Timeout") or 2 * SECOND),
            "Definition": {}, "CreateIndex": service.create_index,
            "ModifyIndex": service.create_index}
        port = alloc.ports.get(check.get("PortLabel") or "", service.port)
        self.loops[check_id] = asyncio.get_running_loop().create_task(
            self._loop(service, check_id, check, port))

    def _deregister(self, sid: str) -> None:
        service = self.state.services.pop(sid, None)
        if service is None:
            return
        for check_id in service.checks:
            loop = self.loops.pop(check_id, None)
            if loop:
                loop.cancel()
        self.state.bump_consul(service.name)

    # ---- running checks ------------------------------------------------------------------

    async def _loop(self, service: ConsulService, check_id: str, check: dict[str, Any],
                    port: int) -> None:
        # Register refuses a check without both (jobcheck.py), so they are set here.
        interval, timeout = check["Interval"] / SECOND, check["Timeout"] / SECOND
        if self.state.timing == "production":
            # agent/checks/check.go CheckHTTP/CheckTCP run: the first check waits a random
            # stagger within the interval (lib.RandomStagger), so a new service's first
            # result comes up to one interval late. A dev-timing double checks at once.
            await asyncio.sleep(random.uniform(0, interval))
        while True:
            status, output = await self._probe(service, check, port, timeout)
            self._update(service, check_id, status, output)
            await asyncio.sleep(interval)

    async def _probe(self, service: ConsulService, check: dict[str, Any], port: int,
                     timeout: float) -> tuple[str, str]:
        slow = self.state.faults.slow_health_s
        if slow and time.monotonic() - self.started.get(service.alloc_id, 0.0) < slow:
            return "critical", "slow"
        kind = check.get("Type")
        if kind == "http":
            return await self._http(check, port, timeout)
        if kind == "tcp":
            return await self._tcp(port, timeout)
        return "critical", f"the double does not run {kind!r} checks"

    async def _http(self, check: dict[str, Any], port: int, timeout: float) -> tuple[str, str]:
        """Consul's CheckHTTP (agent/checks/check.go): a new connection per check (its
        transport sets DisableKeepAlives, so Go sends `Connection: close`), its User-Agent and
        Accept unless the check's headers set them; 2xx passing, 429 warning, else critical;
        the output `HTTP <method> <url>: <status line> Output: <body>`. Written on asyncio
        streams rather than an HTTP client library: at 1,000 engines checked every second the
        double must stay cheap (the at-rest bench)."""
        path = check.get("Path") or "/"
        path = path if path.startswith("/") else "/" + path
        url = f"http://127.0.0.1:{port}{path}"
        method = check.get("Method") or "GET"
        headers = {k: list(v) for k, v in (check.get("Header") or {}).items()}
        try:
            status, reason, body = await asyncio.wait_for(
                _request(port, method, path, headers, (check.get("Body") or "").encode()), timeout)
        except TimeoutError:
            return "critical", f"{method} {url}: Client.Timeout exceeded while awaiting headers"
        except (OSError, ValueError) as exc:
            return "critical", f"{method} {url}: {exc.__class__.__name__}: {exc}"
        output = (f"HTTP {method} {url}: {status} {reason} Output: "
                  f"{body[:OUTPUT_MAX].decode(errors='replace')}")
        if 200 <= status < 300:
            return "passing", output
        return ("warning" if status == 429 else "critical"), output

    async def _tcp(self, port: int, timeout: float) -> tuple[str, str]:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        except (TimeoutError, OSError) as exc:
            return "critical", f"dial tcp 127.0.0.1:{port}: {exc}"
        writer.close()
        return "passing", f"TCP connect 127.0.0.1:{port}: Success"

    def _update(self, service: ConsulService, check_id: str, status: str, output: str) -> None:
        if self.state.services.get(service.id) is not service:
            return  # deregistered while the probe ran
        current = service.checks[check_id]
        if current["Status"] == status and current["Output"] == output:
            return  # Consul's index moves only on a real change
        current["Status"], current["Output"] = status, output
        current["ModifyIndex"] = self.state.bump_consul(service.name)


async def _request(port: int, method: str, path: str, headers: dict[str, list[str]],
                   body: bytes) -> tuple[int, str, bytes]:
    """One HTTP/1.1 request on a new connection, read to its end: (status, reason, body)."""
    names = {k.lower() for k in headers}
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, vals in headers.items() if k.lower() != "host" for v in vals]
    lines += [line for name, line in (("user-agent", f"User-Agent: {USER_AGENT}"),
                                      ("accept", "Accept: text/plain, text/*, */*"))
              if name not in names]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        raw = await reader.read(-1)   # `Connection: close`: the answer ends with the stream
    finally:
        writer.close()
    head, sep, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, code_reason = status_line.partition(" ")
    code, _, reason = code_reason.partition(" ")
    if not sep or not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"malformed HTTP response {status_line[:80]!r}")
    fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if fields.get("transfer-encoding", "").lower() == "chunked":
        rest = _unchunk(rest)
    elif fields.get("content-length", "").isdigit():
        rest = rest[:int(fields["content-length"])]
    return int(code), reason, rest


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";", 1)[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


def _group(alloc: Alloc) -> dict[str, Any]:
    return next(g for g in alloc.job["TaskGroups"] if g["Name"] == alloc.group)
