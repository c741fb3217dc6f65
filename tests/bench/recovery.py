"""Recovery from node loss, on the Nomad double with three nodes and S3 (`weed mini`): an
engine with a BENCH_RECOVERY_MB brain is snapshotted, its node is lost, and the time is taken
until the engine is admitted again on another node (its latest snapshot restored into a new
volume by the prestart task). ORCH_NODE_LOST_RESTORE_S is BENCH_NODE_LOST_RESTORE_S (5 s
here, 300 s by default), and is reported apart. Beside it, in the same run: a new user's first
admit on the same cluster, and a plain `tar -cf` plus `tar -xf` of the same brain.

Before the loss, a stop with 1% of the brain changed since its latest snapshot (which copies
it first, the sidecar stopping with the engine) beside a stop with nothing changed (one
fingerprint call). The schedule is on (a day, so no scheduled copy falls in the run).

The double's timing is a production client's unless BENCH_RECOVERY_TIMING=dev: a new volume
is ready at its node's next update, 5-10 s (tests/doubles/README.md, Timing).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from tests.bench import plain_tar
from tests.harness import Orchestrator, wait_for
from tests.s3server import BUCKET, s3_server

MB = int(os.environ.get("BENCH_RECOVERY_MB", "100"))
RESTORE_AFTER_S = float(os.environ.get("BENCH_NODE_LOST_RESTORE_S", "5"))
TIMING = os.environ.get("BENCH_RECOVERY_TIMING", "production")
FILE_KB = 256
USER = "lost"


def bench_recovery(tmp: Path) -> dict[str, Any]:
    weed = tmp / "weed"
    weed.mkdir(parents=True, exist_ok=True)
    os.environ["ORCH_TEST_DOUBLE_TIMING"] = TIMING   # read by tests/scheduler.py
    try:
        with s3_server(weed) as s3:
            env = {**s3, "ORCH_SNAPSHOT_STORE": f"s3://{BUCKET}/recovery",
                   "ORCH_SNAPSHOT_INTERVAL_S": "86400",
                   "ORCH_NODE_LOST_RESTORE_S": str(RESTORE_AFTER_S), "ORCH_BOOT_TIMEOUT_S": "60",
                   "ORCH_LOG_LEVEL": "WARNING", "ORCH_TICK_S": "0.1", "ORCH_LEASE_S": "5"}
            orch = Orchestrator(tmp / "orch", env=env, driver="nomad").start()
            try:
                return _measure(orch, tmp)
            finally:
                orch.close()
    finally:
        os.environ.pop("ORCH_TEST_DOUBLE_TIMING", None)


def _measure(orch: Orchestrator, tmp: Path) -> dict[str, Any]:
    orch.product("bench")
    api = orch.client("bench", timeout=120)
    started = time.perf_counter()
    first = api.post(f"/engines/{USER}/admit", json={"auto_provision": True})
    first_admit_s = time.perf_counter() - started
    assert first.status_code == 200, first.text
    state = _state(orch)
    brain = Path(state["volume_path"])
    for n in range(MB * 1024 // FILE_KB):
        (brain / f"f{n:05d}").write_bytes(os.urandom(FILE_KB * 1024))
    snap = api.post(f"/engines/{USER}/snapshots")
    assert snap.status_code == 201, snap.text
    tar_s = round(plain_tar.tar(brain, tmp)["s"] + plain_tar.untar(tmp), 3)
    stop_changed_s, stop_unchanged_s = _stops(api, brain)
    lost_node = state["node"]
    started = time.perf_counter()
    orch.stack.node_lost(lost_node)
    wait_for(lambda: _back_elsewhere(orch, api, lost_node), timeout=RESTORE_AFTER_S + 120,
             interval=0.05, what="the engine admitted on another node")
    recovered_s = time.perf_counter() - started
    moved = Path(_state(orch)["volume_path"])
    files = len(list(moved.iterdir()))
    return {"mb": MB, "timing": TIMING, "restore_after_s": RESTORE_AFTER_S,
            "recovered_s": round(recovered_s, 2), "files": files,
            "first_admit_s": round(first_admit_s, 2), "tar_s": tar_s,
            "stop_changed_s": stop_changed_s, "stop_unchanged_s": stop_unchanged_s}


def _stops(api: httpx.Client, brain: Path) -> tuple[float, float]:
    """A stop with 1% of the brain changed (a copy first), then, started again, one with
    nothing changed; each leaves exactly the snapshots it should."""
    def count() -> int:
        return len(api.get(f"/engines/{USER}/snapshots").json()["snapshots"])
    for n in range(max(1, MB * 1024 // FILE_KB // 100)):
        (brain / f"f{n:05d}").write_bytes(os.urandom(FILE_KB * 1024))
    before, took = count(), []
    for _ in range(2):
        started = time.perf_counter()
        stopped = api.post(f"/engines/{USER}/stop")
        took.append(round(time.perf_counter() - started, 2))
        assert stopped.status_code == 200, stopped.text
        assert api.post(f"/engines/{USER}/start").status_code == 200
    assert count() == before + 1
    return took[0], took[1]


def _state(orch: Orchestrator) -> dict[str, Any]:
    row = orch.engine_row(USER)
    assert row is not None
    state: dict[str, Any] = json.loads(row["driver_state"])
    return state


def _back_elsewhere(orch: Orchestrator, api: httpx.Client, lost_node: str) -> bool:
    row = orch.engine_row(USER)
    if row is None or row["status"] != "running" or json.loads(row["driver_state"]).get("node") == lost_node:
        return False
    return bool(api.post(f"/engines/{USER}/admit").json().get("admitted"))


def lines(r: dict[str, Any]) -> list[str]:
    return [f"node lost  {r['mb']} MB brain, nomad double ({r['timing']} timing, 3 nodes, S3): "
            f"admitted on another node {r['recovered_s']} s after the loss, of which "
            f"ORCH_NODE_LOST_RESTORE_S={r['restore_after_s']:g} s waiting   "
            f"first admit of a new user {r['first_admit_s']} s   plain tar+untar {r['tar_s']} s",
            f"stop       {r['mb']} MB brain, 1% changed since its latest snapshot (copied first): "
            f"{r['stop_changed_s']} s   nothing changed (one fingerprint call): "
            f"{r['stop_unchanged_s']} s"]
