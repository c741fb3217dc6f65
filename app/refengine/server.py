"""The reference engine: honours the engine contract of the spec, standard library only (so it
boots in tens of milliseconds, and its boot time does not hide the orchestrator's).

Environment: ENGINE_PORT (required), ENGINE_HOST (default 127.0.0.1), ENGINE_BRAIN_DIR
(required), ENGINE_API_KEY_FILE (required; re-read on SIGHUP), ENGINE_USER_ID, ENGINE_VERSION.

Routes: GET /health (no auth); with `Authorization: Bearer <key>`: GET /v1/keycheck,
GET /v1/info, PUT/GET/DELETE /v1/memory/{key} (stored in the brain), POST /v1/admin/exit
{"code": n} and POST /v1/admin/health {"healthy": bool} (for tests of crashes and checks).

Fault knobs for tests, as `+`-separated tokens in ENGINE_VERSION (e.g. `ref-1+fault-crash`):
  fault-crash            exit 3 at start, before ever being healthy
  fault-never-healthy    /health always answers 503
  fault-hang-term        ignore SIGTERM (only SIGKILL ends it)
  boot-delay-<ms>        wait that long before listening
  fault-crash-after-<ms> become healthy, then exit 3 after that long
  hup-delay-<ms>         re-read the key that long after SIGHUP (a slow key rotation)
"""

from __future__ import annotations

import hmac
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_VALUE = 1024 * 1024
MAX_KEY = 200


def say(line: str) -> None:
    print(line, flush=True)


class Engine:
    def __init__(self, env: dict[str, str]):
        self.port = int(env["ENGINE_PORT"])
        self.host = env.get("ENGINE_HOST") or "127.0.0.1"
        self.brain = Path(env["ENGINE_BRAIN_DIR"])
        self.key_file = Path(env["ENGINE_API_KEY_FILE"])
        self.user_id = env.get("ENGINE_USER_ID", "")
        self.version = env.get("ENGINE_VERSION", "")
        self.faults = set(self.version.split("+")[1:])
        self.healthy = "fault-never-healthy" not in self.faults
        self.started_at = time.time()
        self.key = ""
        self.reload_key()
        self.brain.mkdir(mode=0o700, parents=True, exist_ok=True)

    def reload_key(self) -> None:
        self.key = self.key_file.read_text().strip()

    def authorised(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer ") or not self.key:
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.key.encode())

    def memory_path(self, name: str) -> Path | None:
        if not 1 <= len(name) <= MAX_KEY:
            return None
        # Hex of the name: no name can climb out of the brain or clash with another.
        return self.brain / ("m-" + name.encode().hex())

    def fault_ms(self, prefix: str) -> int | None:
        for token in self.faults:
            if token.startswith(prefix) and token[len(prefix):].isdigit():
                return int(token[len(prefix):])
        return None


class Handler(BaseHTTPRequestHandler):
    server_version = "refengine/1"
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, a keep-alive client waits ~40 ms
    # for the second (delayed ACK). Health checks after a wake are exactly that case.
    disable_nagle_algorithm = True
    engine: Engine

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the orchestrator's logs matter, not one line per request here

    def do_GET(self) -> None:
        self._route("GET")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        engine = self.engine
        path = self.path.split("?", 1)[0]
        if path == "/health" and method == "GET":
            if engine.healthy:
                return self._json(200, {"status": "ok"})
            return self._json(503, {"status": "unhealthy"})
        body = self._body()
        if body is None:
            return self._json(413, {"error": "too large"})
        if not engine.authorised(self.headers.get("Authorization")):
            return self._json(401, {"error": "unauthorized"})
        if path == "/v1/keycheck" and method == "GET":
            return self._json(200, {"ok": True})
        if path == "/v1/info" and method == "GET":
            return self._json(200, {"user_id": engine.user_id, "version": engine.version,
                                    "pid": os.getpid(), "started_at": engine.started_at})
        if path.startswith("/v1/memory/"):
            return self._memory(method, path[len("/v1/memory/"):], body)
        if path == "/v1/admin/exit" and method == "POST":
            code = int(_field(body, "code", 1))
            self._json(202, {"exiting": code})
            threading.Timer(0.05, os._exit, args=(code,)).start()
            return None
        if path == "/v1/admin/health" and method == "POST":
            engine.healthy = bool(_field(body, "healthy", True))
            return self._json(200, {"healthy": engine.healthy})
        return self._json(404, {"error": "not found"})

    def _memory(self, method: str, raw_name: str, body: bytes) -> None:
        from urllib.parse import unquote

        target = self.engine.memory_path(unquote(raw_name))
        if target is None:
            return self._json(400, {"error": "bad key"})
        if method == "PUT":
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(body)
            os.replace(tmp, target)
            return self._json(200, {"stored": len(body)})
        if not target.exists():
            return self._json(404, {"error": "no such key"})
        if method == "GET":
            return self._send(200, target.read_bytes(), "application/octet-stream")
        if method == "DELETE":
            target.unlink()
            return self._send(204, b"", "application/json")
        return self._json(405, {"error": "method not allowed"})

    def _body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_VALUE:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _field(body: bytes, name: str, default: Any) -> Any:
    try:
        return json.loads(body or b"{}").get(name, default)
    except (ValueError, AttributeError):
        return default


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    missing = [v for v in ("ENGINE_PORT", "ENGINE_BRAIN_DIR", "ENGINE_API_KEY_FILE") if not env.get(v)]
    if missing:
        print(f"refengine: {', '.join(missing)} must be set", file=sys.stderr)
        return 2
    engine = Engine(env)
    if "fault-crash" in engine.faults:
        say("crashing on purpose (fault-crash)")
        return 3
    delay = engine.fault_ms("boot-delay-")
    if delay:
        time.sleep(delay / 1000)
    Handler.engine = engine
    server = ThreadingHTTPServer((engine.host, engine.port), Handler)
    server.daemon_threads = True
    _install_signals(engine, server)
    crash_after = engine.fault_ms("fault-crash-after-")
    if crash_after is not None:
        threading.Timer(crash_after / 1000, os._exit, args=(3,)).start()
    say(f"listening on {engine.host}:{engine.port}")
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    say("shutdown complete")
    return 0


def _install_signals(engine: Engine, server: ThreadingHTTPServer) -> None:
    def reload() -> None:
        engine.reload_key()
        say("reloaded key")

    def on_hup(signum: int, frame: Any) -> None:
        delay = engine.fault_ms("hup-delay-")
        if delay:
            threading.Timer(delay / 1000, reload).start()
        else:
            reload()  # a small file read: safe enough in the main thread's handler

    def on_term(signum: int, frame: Any) -> None:
        if "fault-hang-term" in engine.faults:
            say("ignoring SIGTERM")
            return
        say("received SIGTERM")
        # shutdown() blocks until serve_forever returns, and serve_forever runs in this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
