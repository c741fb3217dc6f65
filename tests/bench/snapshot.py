"""The snapshot figures: a 100 MB brain (BENCH_SNAPSHOT_MB) of 256 KiB files, snapshotted,
then snapshotted again with 1% of it rewritten, then restored, on the directory store and on
S3 (SeaweedFS's `weed mini` on loopback), each beside a plain `tar` of the same directory in
the same run: `tar -cf` for a snapshot (tar stores everything every time), `tar -xf` into an
empty directory for a restore. Bytes stored are what the snapshot sent to the store (its
manifest's new_bytes) against the tar's size. A restore through the API also stops and starts
the engine; the engine's restart alone is measured beside it. Then recovery from node loss on
the Nomad double (tests/bench/recovery.py).

Run alone: `BENCH_ONLY=snapshot make bench` (about a minute).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from app.snapshots import service
from app.snapshots.store import open_store
from tests.bench import plain_tar, recovery
from tests.harness import Orchestrator
from tests.s3server import BUCKET, s3_server

MB = int(os.environ.get("BENCH_SNAPSHOT_MB", "100"))
FILE_KB = 256
USER = "brainy"


def bench_snapshot(tmp: Path) -> dict[str, Any]:
    results = {"file": _one(tmp / "file", {})}
    with s3_server(_mkdir(tmp / "weed")) as s3:
        results["s3"] = _one(tmp / "s3", {**s3, "ORCH_SNAPSHOT_STORE": f"s3://{BUCKET}/bench"})
    return {"stores": results, "node_loss": recovery.bench_recovery(tmp / "node-loss")}


def _one(tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    orch = Orchestrator(tmp, env={"ORCH_LOG_LEVEL": "WARNING", "ORCH_SNAPSHOT_INTERVAL_S": "0",
                                  "ORCH_BOOT_TIMEOUT_S": "30", **env}).start()
    orch.product("bench")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the bench reads the store the way the orchestrator does
    try:
        api = orch.client("bench", timeout=300)
        assert api.post("/engines/provision", json={"user_id": USER}).status_code == 200
        brain = next((orch.state_dir / "brains").iterdir())
        files = MB * 1024 // FILE_KB
        for n in range(files):
            (brain / f"f{n:05d}").write_bytes(os.urandom(FILE_KB * 1024))
        store = open_store(env.get("ORCH_SNAPSHOT_STORE") or (orch.state_dir / "snapshots").as_uri())
        first = _snapshot(api, store, brain)
        tar_first = plain_tar.tar(brain, tmp)
        for n in range(0, files, 100):  # 1% of the files rewritten
            (brain / f"f{n:05d}").write_bytes(os.urandom(FILE_KB * 1024))
        second = _snapshot(api, store, brain)
        tar_second = plain_tar.tar(brain, tmp)
        started = time.perf_counter()
        assert api.post(f"/engines/{USER}/restore", json={"snapshot_id": first["id"]}).status_code == 200
        restore_s = time.perf_counter() - started
        started = time.perf_counter()
        assert api.post(f"/engines/{USER}/stop").status_code == 200
        assert api.post(f"/engines/{USER}/start").status_code == 200
        restart_s = time.perf_counter() - started
        untar_s = plain_tar.untar(tmp)
        return {"mb": MB, "first_s": first["s"], "first_bytes": first["new_bytes"],
                "next_s": second["s"], "next_bytes": second["new_bytes"],
                "tar_s": tar_first["s"], "tar_bytes": tar_first["bytes"], "tar_next_s": tar_second["s"],
                "restore_s": round(restore_s, 3), "restart_s": round(restart_s, 3),
                "untar_s": untar_s}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        orch.close()


def _snapshot(api: Any, store: Any, brain: Path) -> dict[str, Any]:
    started = time.perf_counter()
    answer = api.post(f"/engines/{USER}/snapshots")
    elapsed = time.perf_counter() - started
    assert answer.status_code == 201, answer.text
    snap_id = answer.json()["id"]
    manifest = json.loads(store.get(service.manifest_key(brain.name, snap_id)))
    return {"id": snap_id, "s": round(elapsed, 3), "new_bytes": manifest["new_bytes"]}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def lines(r: dict[str, Any]) -> list[str]:
    out = []
    for store, f in r["stores"].items():
        out += [
            f"snapshot {store:4} {f['mb']} MB  first {f['first_s']} s, {f['first_bytes'] / 2**20:.1f} MiB "
            f"stored   plain tar {f['tar_s']} s, {f['tar_bytes'] / 2**20:.1f} MiB",
            f"snapshot {store:4} 1% changed  next {f['next_s']} s, {f['next_bytes'] / 2**20:.2f} MiB "
            f"stored   plain tar {f['tar_next_s']} s, {f['tar_bytes'] / 2**20:.1f} MiB",
            f"restore  {store:4} {f['restore_s']} s (with the engine's stop and start: "
            f"{f['restart_s']} s alone)   plain untar {f['untar_s']} s"]
    return out + recovery.lines(r["node_loss"])


