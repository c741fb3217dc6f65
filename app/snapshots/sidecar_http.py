"""The sidecar's HTTP/1.1 JSON server (the standard library's: a small resident footprint):
routes behind a bearer token read from the config on every request, errors in the contract's
shape."""

from __future__ import annotations

import hmac
import json
import socket
import sys
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from app import errors

MAX_BODY = 64 * 1024


class Refused(Exception):
    """An answer other than 200: its status, code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Stopping(Exception):
    """The sidecar is stopping: the request gets no answer, as from any killed process."""


Route = Callable[[Mapping[str, Any]], dict[str, Any]]  # given the config read for the request


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a snapshot under way does not hold up SIGTERM's exit

    def __init__(self, address: tuple[str, int], config: Callable[[], Mapping[str, Any]],
                 routes: Mapping[str, Mapping[str, Route]]):
        self.address_family = _family(address[0])
        super().__init__(address, Handler)
        self.config, self.routes = config, routes


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def do_GET(self) -> None:
        self._answer(self.command)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _answer(self, method: str) -> None:
        self._drain()
        try:
            status, body = 200, self._route(method)
        except Stopping:
            self.close_connection = True
            return
        except Refused as exc:
            status, body = exc.status, {"error": {"code": exc.code, "message": exc.message}}
        except errors.SnapshotStoreFailed as exc:
            status, body = 502, {"error": {"code": "SNAPSHOT_STORE_FAILED", "message": str(exc)}}
        except Exception as exc:  # noqa: BLE001 - a bug: said in the answer and the log
            status, body = 500, {"error": {"code": "INTERNAL", "message": repr(exc)}}
        if status >= 500:
            sys.stderr.write(f"{method} {self.path}: {status} {body['error']['message']}\n")
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> dict[str, Any]:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if method != "GET":
                raise Refused(405, "METHOD_NOT_ALLOWED", f"{method} {path}: only GET")
            return {"status": "ok"}
        methods = self.server.routes.get(path)
        if methods is None:
            raise Refused(404, "NOT_FOUND", f"no route {path}")
        if method not in methods:
            raise Refused(405, "METHOD_NOT_ALLOWED", f"{method} {path}: only {', '.join(methods)}")
        config = self.server.config()
        self._authorize(config)
        return methods[method](config)

    def _authorize(self, config: Mapping[str, Any]) -> None:
        token = config.get("token")
        given = self.headers.get("Authorization", "")
        if not isinstance(token, str) or not token or \
                not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Refused(401, "UNAUTHORIZED", "missing or wrong Authorization: Bearer token")

    def _drain(self) -> None:
        """Read the request's body (none is expected), so the connection can serve the next."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = MAX_BODY + 1
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # every request is the orchestrator's, logged there; failures are logged above


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
