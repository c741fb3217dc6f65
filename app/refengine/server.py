"""The reference engine's HTTP side: routes, bodies, the accept loop and the clean stop. The
contract (environment, routes, signals, fault knobs) is documented in app.refengine.

The main thread accepts connections and acts on signals (app.refengine.signals); each
connection is served in its own thread.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote_to_bytes

from app.refengine import identity
from app.refengine.config import Config, say
from app.refengine.signals import Signals, after
from app.refengine.store import MAX_KEY_CHARS, MAX_VALUE_BYTES, Brain, KeyStore

MEMORY_PREFIX = "/v1/memory/"
DISCARD_MAX = 8 * MAX_VALUE_BYTES  # bodies we read and drop so the client sees our answer
DRAIN_S = 3.0  # how long a stop waits for in-flight requests
EXIT_DELAY_S = 0.05  # admin/exit: time for the 202 to leave before the process does
CHECKPOINT_HOLD_S = 60.0  # how long a checkpoint holds writes unless told otherwise
CHECKPOINT_HOLD_MAX_S = 600.0
CHECKPOINT_WAIT_S = 10.0  # for the writes in progress to finish


class InFlight:
    """Requests being handled (not idle keep-alive connections), so a stop can wait for them."""

    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    def enter(self) -> None:
        with self._cond:
            self._count += 1

    def leave(self) -> None:
        with self._cond:
            self._count -= 1
            if not self._count:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._count, timeout)


class EngineServer(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not hold up the exit

    def __init__(self, sock: socket.socket, config: Config, keys: KeyStore, brain: Brain,
                 started_at: str):
        # The socket is bound and listening already (app.refengine.boot), so no bind here.
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        # HTTPServer.server_bind would also resolve our fully qualified name, a DNS lookup that
        # can be slow where DNS is, for a name nothing here uses.
        host, port = sock.getsockname()[:2]
        self.server_name, self.server_port = str(host), int(port)
        # Non-blocking: a connection reset between our select and accept must not block the
        # main loop (and with it signal handling) until the next client comes.
        sock.setblocking(False)
        self.timeout = 0.0
        self.config = config
        self.keys = keys
        self.brain = brain
        self.started_at = started_at
        self.healthy = True
        self.stopping = False
        self.inflight = InFlight()
        self.identity_lock = threading.Lock()

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket],
                     client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away is not our bug
        super().handle_error(request, client_address)  # a traceback on stderr: a bug


class Handler(BaseHTTPRequestHandler):
    server: EngineServer
    server_version = "refengine/1"
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, a keep-alive client waits ~40 ms
    # for the second (delayed ACK). Health checks after a wake are exactly that case.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the lines tests look for

    def do_GET(self) -> None:
        self.server.inflight.enter()
        try:
            self._dispatch()
        finally:
            self.server.inflight.leave()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # ---- routing ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        server = self.server
        path = self.path.partition("?")[0]
        method = "GET" if self.command == "HEAD" else self.command
        if path == "/health" and method == "GET":
            return self._health()
        length = self._body_length()
        if not server.keys.authorised(self.headers.get("Authorization")):
            self._discard(length)
            return self._json(401, {"error": "unauthorized"}, [("WWW-Authenticate", "Bearer")])
        if length is None:
            self.close_connection = True  # we cannot tell where this request ends
            return self._json(400, {"error": "a body needs a Content-Length (no chunked bodies)"})
        if length > MAX_VALUE_BYTES:
            self._discard(length)
            return self._json(413, {"error": "body too large", "max_bytes": MAX_VALUE_BYTES})
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True  # the client went away mid-body: nobody to answer
            return None
        if path.startswith(MEMORY_PREFIX):
            return self._memory(method, path[len(MEMORY_PREFIX):], body)
        if path == "/v1/checkpoint":
            return self._checkpoint(method, body)
        route = ROUTES.get(path)
        if route is None:
            return self._json(404, {"error": "not found"})
        allowed, action = route
        if method != allowed:
            return self._json(405, {"error": "method not allowed"}, [("Allow", allowed)])
        return action(self, body)

    def _health(self) -> None:
        if self.server.healthy and not self.server.config.faults.never_healthy:
            return self._json(200, {"status": "ok"})
        return self._json(503, {"status": "unhealthy"})

    def _keycheck(self, body: bytes) -> None:
        self._json(200, {"ok": True})

    def _info(self, body: bytes) -> None:
        config = self.server.config
        self._json(200, {"user_id": config.user_id, "version": config.version,
                         "pid": os.getpid(), "started_at": self.server.started_at})

    def _identity(self, body: bytes) -> None:
        data = self._json_object(body)
        if data is None:
            return
        user_id = data.get("user_id")
        if not isinstance(user_id, str) or not user_id:
            return self._json(400, {"error": "user_id must be a non-empty string"})
        server = self.server
        if server.config.faults.identity_delay_ms:
            say(f"holding an identity call for {user_id!r}")  # so a test knows it arrived
            time.sleep(server.config.faults.identity_delay_ms / 1000)
        if server.config.faults.identity_drop_unheard and self._client_gone():
            say(f"dropped an identity call for {user_id!r}: its client left")
            self.close_connection = True
            return None
        with server.identity_lock:
            current = server.config.user_id
            if current and current != user_id:
                return self._json(409, {"error": "this engine has a user", "user_id": current})
            if not current:
                identity.save(server.config.brain_dir, user_id)
                server.config.user_id = user_id
                say(f"claimed by user {user_id!r}")
        self._json(200, {"user_id": user_id})

    def _client_gone(self) -> bool:
        """The client closed its side: a peek finds the end of the stream, not a wait."""
        try:
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True  # reset: gone too
        return peeked == b""

    def _admin_exit(self, body: bytes) -> None:
        data = self._json_object(body)
        if data is None:
            return
        code = data.get("code")
        if type(code) is not int or not 0 <= code <= 255:  # type(): True is an int, not a code
            return self._json(400, {"error": "code must be an integer from 0 to 255"})
        say(f"exiting with code {code} (admin/exit)")
        self._json(202, {"exiting": code})
        after(EXIT_DELAY_S, os._exit, code)  # os._exit: a crash, not a clean shutdown

    def _admin_health(self, body: bytes) -> None:
        data = self._json_object(body)
        if data is None:
            return
        healthy = data.get("healthy")
        if type(healthy) is not bool:
            return self._json(400, {"error": "healthy must be true or false"})
        self.server.healthy = healthy
        say(f"health set to {'healthy' if healthy else 'unhealthy'} (admin/health)")
        self._json(200, {"healthy": healthy and not self.server.config.faults.never_healthy})

    def _checkpoint(self, method: str, body: bytes) -> None:
        gate = self.server.brain.gate
        if method == "DELETE":
            if gate.release():
                return self._json(200, {"released": True})
            return self._json(409, {"error": "no checkpoint is held (its hold ran out)"})
        if method != "POST":
            return self._json(405, {"error": "method not allowed"}, [("Allow", "POST, DELETE")])
        data = self._json_object(body)
        if data is None:
            return None
        hold = data.get("hold_s", CHECKPOINT_HOLD_S)
        if not isinstance(hold, (int, float)) or isinstance(hold, bool) \
                or not 0 < hold <= CHECKPOINT_HOLD_MAX_S:
            return self._json(400, {"error": f"hold_s must be a number of seconds up to "
                                             f"{CHECKPOINT_HOLD_MAX_S:g}"})
        # Every value is written by rename (app.refengine.store), so once the writes in
        # progress are done the directory holds whole values only: nothing else to flush.
        if not gate.hold(float(hold), CHECKPOINT_WAIT_S):
            return self._json(503, {"error": "writes did not finish in time"})
        return self._json(200, {"held_s": hold})

    def _memory(self, method: str, raw_key: str, body: bytes) -> None:
        key = _memory_key(raw_key)
        if key is None:
            return self._json(400, {"error": f"a memory key is 1 to {MAX_KEY_CHARS} characters"
                                              " of UTF-8, percent-encoded"})
        brain = self.server.brain
        try:
            if method == "PUT":
                with brain.gate:
                    brain.put(key, body)
                return self._json(200, {"stored": len(body)})
            if method == "GET":
                value = brain.get(key)
                if value is None:
                    return self._json(404, {"error": "no such key"})
                return self._send(200, value, "application/octet-stream")
            if method == "DELETE":
                with brain.gate:
                    deleted = brain.delete(key)
                if not deleted:
                    return self._json(404, {"error": "no such key"})
                return self._send(204, b"", None)
        except OSError as exc:  # a full or read-only disk: say so rather than drop the connection
            say(f"brain error: {exc.strerror or exc}")
            return self._json(507, {"error": "the brain could not be written or read"})
        return self._json(405, {"error": "method not allowed"}, [("Allow", "GET, PUT, DELETE")])

    # ---- bodies and answers -----------------------------------------------------------------

    def _body_length(self) -> int | None:
        """The declared body length, or None when we cannot tell where the body ends."""
        if self.headers.get("Transfer-Encoding"):
            return None
        raw = self.headers.get("Content-Length", "0").strip()
        return int(raw) if raw.isascii() and raw.isdigit() else None

    def _discard(self, length: int | None) -> None:
        # Reading what the client sends lets it read our answer; when there is too much, or we
        # do not know how much, closing is the only way to find the next request.
        if length is None or length > DISCARD_MAX:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                self.close_connection = True
                return
            length -= len(chunk)

    def _json_object(self, body: bytes) -> dict[str, object] | None:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self._json(400, {"error": "the body must be a JSON object"})
            return None
        return data

    def _json(self, status: int, data: dict[str, object],
              headers: Iterable[tuple[str, str]] = ()) -> None:
        self._send(status, json.dumps(data, separators=(",", ":")).encode(), "application/json",
                   headers)

    def _send(self, status: int, payload: bytes, content_type: str | None,
              headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        if status != 204:  # a 204 has no body and must not declare a length
            self.send_header("Content-Type", content_type or "application/octet-stream")
            self.send_header("Content-Length", str(len(payload)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection or self.server.stopping:
            self.send_header("Connection", "close")
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)


ROUTES: dict[str, tuple[str, Callable[[Handler, bytes], None]]] = {
    "/v1/keycheck": ("GET", Handler._keycheck),
    "/v1/info": ("GET", Handler._info),
    "/v1/identity": ("PUT", Handler._identity),
    "/v1/admin/exit": ("POST", Handler._admin_exit),
    "/v1/admin/health": ("POST", Handler._admin_health),
}


def _memory_key(raw: str) -> str | None:
    # The request line arrives decoded as latin-1: back to its bytes, then percent-decoding,
    # then UTF-8, so a key means the same whatever the client escaped.
    try:
        key = unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return None
    return key if 1 <= len(key) <= MAX_KEY_CHARS else None


def serve(server: EngineServer, signals: Signals) -> None:
    """Accept connections and act on signals until told to stop."""
    with selectors.DefaultSelector() as selector:
        selector.register(signals.fd, selectors.EVENT_READ)
        selector.register(server.socket, selectors.EVENT_READ)
        while True:
            ready = {key.fd for key, _ in selector.select()}
            # Signals first: a key rotation signalled before a connection came applies to it.
            if signals.fd in ready and signals.handle():
                return
            if server.socket.fileno() in ready:
                server.handle_request()  # timeout 0: accept the ready one, never wait


def shut_down(server: EngineServer) -> None:
    server.stopping = True  # answers from now on close their connections
    server.server_close()  # no new connections: the kernel refuses them
    if not server.inflight.wait_idle(DRAIN_S):
        say(f"in-flight requests still running after {DRAIN_S:g}s; leaving them")
    say("shutdown complete")
