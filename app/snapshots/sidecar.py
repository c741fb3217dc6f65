"""The snapshot sidecar: beside an engine on Nomad, it copies the engine's brain into the
store when the orchestrator asks (serve mode), or fills a new volume from a snapshot before the
engine starts (restore mode). `python -m app.snapshots.sidecar`.

It imports the standard library and app.snapshots.{store,tree} only: it runs beside every
engine, so its memory counts, and its image holds nothing else. Each snapshot is taken by a
child process of its own (the internal mode `take`), which alone imports boto3 and opens a
client: ~30 MB that would otherwise stay resident beside every engine for good.

Environment: ORCH_SIDECAR_MODE (serve | restore; take is serve's child's, with
ORCH_SIDECAR_PARENT, serve's pid), ORCH_SIDECAR_BRAIN (the volume's mount), ORCH_SIDECAR_CONFIG
(the JSON file Nomad renders from the task's variable: store, aws, prefix, token,
copy_timeout_s; restore: source_prefix, snapshot), ORCH_SIDECAR_HOST and ORCH_SIDECAR_PORT
(serve).
The config file is read again on every request, so a rewritten variable applies at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app import errors
from app.snapshots import tree
from app.snapshots.sidecar_http import Refused, Server, Stopping
from app.snapshots.store import open_store

_SNAPSHOT_ID = re.compile(r"s-[0-9]{17}-[0-9a-f]{8}")
_PREFIX = re.compile(r"([a-z0-9][a-z0-9-]*/)+")
_PR_SET_PDEATHSIG = 1


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise errors.SnapshotStoreFailed(f"the sidecar's config {path} cannot be read: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("store"), str):
        raise errors.SnapshotStoreFailed(f"the sidecar's config {path} names no store")
    return config


def copy_timeout(config: Mapping[str, Any]) -> float | None:
    """How long a copy may take (`copy_timeout_s`; none given: no limit)."""
    value = config.get("copy_timeout_s")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise errors.SnapshotStoreFailed(f"the sidecar's config has no valid 'copy_timeout_s': {value!r}")
    return float(value)


def checked_prefix(config: Mapping[str, Any], key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str) or not _PREFIX.fullmatch(value):
        raise errors.SnapshotStoreFailed(f"the sidecar's config has no valid {key!r}: {value!r}")
    return value


class Sidecar:
    """What serve mode does; one snapshot at a time, each in a child process."""

    def __init__(self, brain: Path, config_path: Path, env: Mapping[str, str]):
        self.brain, self.config_path, self.env = brain, config_path, env
        self.busy = threading.Lock()
        self._guard = threading.Lock()  # over child and stopping, which SIGTERM's stop() reads
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def config(self) -> dict[str, Any]:
        return read_config(self.config_path)

    def fingerprint(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"fingerprint": tree.fingerprint(self.brain)}  # metadata only: nothing to import

    def snapshot(self, config: Mapping[str, Any]) -> dict[str, Any]:
        if not self.busy.acquire(blocking=False):
            raise Refused(409, "BUSY", "a snapshot of this brain is under way")
        try:
            checked_prefix(config, "prefix")
            return self._take(copy_timeout(config))
        finally:
            self.busy.release()

    def _take(self, timeout: float | None) -> dict[str, Any]:
        """`take` mode in a child, with this process's environment (so the same brain and
        config file); its stdout is the answer, its one stderr line the reason it failed.
        A child still copying after `timeout` is killed: the caller has given up by then, and
        the brain must not stay BUSY for a copy nobody waits for."""
        with self._guard:
            if self.stopping:
                raise Stopping
            self.child = subprocess.Popen(
                [sys.executable, "-m", "app.snapshots.sidecar"],
                env={**self.env, "ORCH_SIDECAR_MODE": "take", "ORCH_SIDECAR_PARENT": str(os.getpid())},
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            child = self.child
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise errors.SnapshotStoreFailed(
                f"the copy into the store took longer than {timeout:g} s and was stopped") from None
        finally:
            with self._guard:
                self.child = None
        if self.stopping:
            raise Stopping
        if child.returncode == 0:
            answer: dict[str, Any] = json.loads(out)
            return answer
        lines = err.decode(errors="replace").strip().splitlines()
        raise errors.SnapshotStoreFailed(
            lines[-1][:2000] if lines else f"the snapshot process ended with {child.returncode}")

    def stop(self) -> None:
        """Kill and reap a snapshot's child: none outlives the sidecar."""
        with self._guard:
            self.stopping = True
            child = self.child
        if child is not None:
            child.kill()
            child.wait()


def _env(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ValueError(f"{name} is not set")
    return value


def serve(env: Mapping[str, str]) -> int:
    sidecar = Sidecar(Path(_env(env, "ORCH_SIDECAR_BRAIN")), Path(_env(env, "ORCH_SIDECAR_CONFIG")),
                      env)
    address = (env.get("ORCH_SIDECAR_HOST") or "127.0.0.1", int(_env(env, "ORCH_SIDECAR_PORT")))
    server = Server(address, sidecar.config, {"/v1/fingerprint": {"GET": sidecar.fingerprint},
                                              "/v1/snapshot": {"POST": sidecar.snapshot}})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    thread.start()
    stop.wait()
    sidecar.stop()
    server.shutdown()
    server.server_close()
    return 0


def take(env: Mapping[str, str]) -> int:
    """One snapshot of the brain into the store, its summary on stdout (serve mode's child)."""
    _die_with_parent(env.get("ORCH_SIDECAR_PARENT"))
    brain = Path(_env(env, "ORCH_SIDECAR_BRAIN"))
    config = read_config(Path(_env(env, "ORCH_SIDECAR_CONFIG")))
    prefix = checked_prefix(config, "prefix")
    try:
        store = open_store(config["store"], config.get("aws") or {})
    except (ValueError, TypeError) as exc:
        raise errors.SnapshotStoreFailed(f"the sidecar's store is unusable: {exc}") from exc
    mark = tree.fingerprint(brain)  # before the copy: a write during it shows next time
    taken = tree.take(store, prefix, brain)
    print(json.dumps({"size_bytes": taken.size_bytes, "new_bytes": taken.new_bytes,
                      "dirs": taken.dirs, "files": taken.files, "fingerprint": mark}), flush=True)
    return 0


def _die_with_parent(parent: str | None) -> None:
    """Be killed when the serve process dies however it dies (SIGKILL after Nomad's
    kill_timeout, the OOM killer), which its SIGTERM handler cannot see to."""
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent and os.getppid() != int(parent):
        raise RuntimeError("the serve process ended before this snapshot began")


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
    modes = {"serve": serve, "restore": restore, "take": take}  # take: serve mode's child only
    try:
        if mode not in modes:
            raise ValueError(f"ORCH_SIDECAR_MODE is serve or restore, not {mode!r}")
        return modes[mode](env)
    except Exception as exc:  # noqa: BLE001 - every failure is one line and exit 1
        _fail(str(exc) or repr(exc))
    return 1


def _fail(message: str) -> None:
    print(f"sidecar: {' '.join(message.split())}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(os.environ))
