"""The snapshot sidecar: beside an engine on Nomad, it copies the engine's brain into the
store when the orchestrator asks (serve mode), or fills a new volume from a snapshot before the
engine starts (restore mode). `python -m app.snapshots.sidecar`.

It imports the standard library and app.snapshots.{store,tree} only (boto3 when the store is
S3): it runs beside every engine, so its memory counts, and its image holds nothing else.

Environment: ORCH_SIDECAR_MODE (serve | restore), ORCH_SIDECAR_BRAIN (the volume's mount),
ORCH_SIDECAR_CONFIG (the JSON file Nomad renders from the task's variable: store, aws, prefix,
token; restore: source_prefix, snapshot), ORCH_SIDECAR_HOST and ORCH_SIDECAR_PORT (serve).
The config file is read again on every request, so a rewritten variable applies at once.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from app import errors
from app.snapshots import tree
from app.snapshots.store import Store, open_store

_SNAPSHOT_ID = re.compile(r"s-[0-9]{17}-[0-9a-f]{8}")
_PREFIX = re.compile(r"([a-z0-9][a-z0-9-]*/)+")
MAX_BODY = 64 * 1024


class Refused(Exception):
    """An answer other than 200: its status, code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise errors.SnapshotStoreFailed(f"the sidecar's config {path} cannot be read: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("store"), str):
        raise errors.SnapshotStoreFailed(f"the sidecar's config {path} names no store")
    return config


def checked_prefix(config: Mapping[str, Any], key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str) or not _PREFIX.fullmatch(value):
        raise errors.SnapshotStoreFailed(f"the sidecar's config has no valid {key!r}: {value!r}")
    return value


class Sidecar:
    """What serve mode does; one snapshot at a time."""

    def __init__(self, brain: Path, config_path: Path):
        self.brain, self.config_path = brain, config_path
        self.busy = threading.Lock()
        self._store: tuple[str, Store] | None = None  # an S3 client costs ~100 ms: kept

    def config(self) -> dict[str, Any]:
        return read_config(self.config_path)

    def store(self, config: Mapping[str, Any]) -> Store:
        aws = config.get("aws") or {}
        identity = json.dumps([config["store"], aws], sort_keys=True)
        if self._store is None or self._store[0] != identity:
            try:
                self._store = (identity, open_store(config["store"], aws))
            except (ValueError, TypeError) as exc:
                raise errors.SnapshotStoreFailed(f"the sidecar's store is unusable: {exc}") from exc
        return self._store[1]

    def fingerprint(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"fingerprint": tree.fingerprint(self.brain)}

    def snapshot(self, config: Mapping[str, Any]) -> dict[str, Any]:
        if not self.busy.acquire(blocking=False):
            raise Refused(409, "BUSY", "a snapshot of this brain is under way")
        try:
            prefix = checked_prefix(config, "prefix")
            store = self.store(config)
            mark = tree.fingerprint(self.brain)  # before the copy: a write during it shows next time
            taken = tree.take(store, prefix, self.brain)
        finally:
            self.busy.release()
        return {"size_bytes": taken.size_bytes, "new_bytes": taken.new_bytes,
                "dirs": taken.dirs, "files": taken.files, "fingerprint": mark}


Route = Callable[[Sidecar, Mapping[str, Any]], dict[str, Any]]
ROUTES: dict[str, dict[str, Route]] = {
    "/v1/fingerprint": {"GET": Sidecar.fingerprint},
    "/v1/snapshot": {"POST": Sidecar.snapshot},
}


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a snapshot under way does not hold up SIGTERM's exit

    def __init__(self, address: tuple[str, int], sidecar: Sidecar):
        self.address_family = _family(address[0])
        super().__init__(address, Handler)
        self.sidecar = sidecar


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
        methods = ROUTES.get(path)
        if methods is None:
            raise Refused(404, "NOT_FOUND", f"no route {path}")
        if method not in methods:
            raise Refused(405, "METHOD_NOT_ALLOWED", f"{method} {path}: only {', '.join(methods)}")
        config = self.server.sidecar.config()
        self._authorize(config)
        return methods[method](self.server.sidecar, config)

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


def _env(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ValueError(f"{name} is not set")
    return value


def serve(env: Mapping[str, str]) -> int:
    sidecar = Sidecar(Path(_env(env, "ORCH_SIDECAR_BRAIN")), Path(_env(env, "ORCH_SIDECAR_CONFIG")))
    address = (env.get("ORCH_SIDECAR_HOST") or "127.0.0.1", int(_env(env, "ORCH_SIDECAR_PORT")))
    server = Server(address, sidecar)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


def restore(env: Mapping[str, str]) -> int:
    """Fill the brain with the snapshot's files, and only those; a rerun ends the same."""
    brain = Path(_env(env, "ORCH_SIDECAR_BRAIN"))
    config = read_config(Path(_env(env, "ORCH_SIDECAR_CONFIG")))
    source, snapshot = checked_prefix(config, "source_prefix"), config.get("snapshot")
    if not isinstance(snapshot, str) or not _SNAPSHOT_ID.fullmatch(snapshot):
        raise errors.SnapshotStoreFailed(f"the sidecar's config has no valid 'snapshot': {snapshot!r}")
    store = open_store(config["store"], config.get("aws") or {})
    raw = store.get(f"{source}manifests/{snapshot}.json")
    if raw is None:
        raise errors.SnapshotNotFound(f"snapshot {snapshot} is not in {store.url}{source}")
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise errors.SnapshotStoreFailed(f"snapshot {snapshot} is damaged in the store") from None
    brain.mkdir(parents=True, exist_ok=True)
    tree.empty(brain)  # a new volume: what is there is a cut-short attempt's
    tree.fill(brain, manifest, lambda digest: tree.read_blob(store, source, digest))
    print(json.dumps({"restored": snapshot, "files": len(files),
                      "dirs": len(manifest.get("dirs", [])),
                      "size_bytes": sum(f[1] for f in files)}), flush=True)
    return 0


def main(env: Mapping[str, str]) -> int:
    mode = env.get("ORCH_SIDECAR_MODE", "serve")
    try:
        if mode == "serve":
            return serve(env)
        if mode == "restore":
            return restore(env)
        raise ValueError(f"ORCH_SIDECAR_MODE is serve or restore, not {mode!r}")
    except Exception as exc:  # noqa: BLE001 - every failure is one line and exit 1
        _fail(str(exc) or repr(exc))
    return 1


def _fail(message: str) -> None:
    print(f"sidecar: {' '.join(message.split())}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(os.environ))
