"""The rollout figure: a fleet moved by one rollout, beside the same fleet moved by single
upgrades one request after another (what a script without rollouts would do).

BENCH_ROLLOUT_ENGINES (default 100) reference engines (real processes, each with a brain) are
provisioned on `ref-1`; then each is upgraded to `ref-2` by its own `POST /upgrade`, waiting
for each answer (the baseline); then one rollout moves them all to `ref-3` in batches of
BENCH_ROLLOUT_BATCH (default 10), timed from `POST /rollouts` until it has succeeded. Both
are a graceful stop plus a boot per engine, so the ratio is what batching buys. At the end
every engine is checked: running `ref-3` (the engine itself says so), its brain intact.

Run alone: `BENCH_ONLY=rollout make bench` (a minute or two on a small machine).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import httpx

from tests.harness import Orchestrator, wait_for

ENGINES = int(os.environ.get("BENCH_ROLLOUT_ENGINES", "100"))
BATCH = int(os.environ.get("BENCH_ROLLOUT_BATCH", "10"))
FINISHED = ("succeeded", "failed", "rolled_back", "aborted")


def bench_rollout(tmp: Path) -> dict:
    env = {"ORCH_LOG_LEVEL": "WARNING", "ORCH_BOOT_TIMEOUT_S": "60", "ORCH_STOP_GRACE_S": "5",
           "ORCH_TICK_S": "1", "ORCH_HEALTH_INTERVAL_S": "10", "ORCH_IDLE_SLEEP_S": "0"}
    orch = Orchestrator(tmp, env=env, ports=ENGINES + 50).start()
    orch.product("bench", max_engines=1_000_000, rpm=1_000_000_000)
    try:
        api = orch.client("bench", timeout=120)
        keys = asyncio.run(_provision(orch, ENGINES))
        singles = []
        started = time.perf_counter()
        for i in range(ENGINES):
            one = time.perf_counter()
            answer = api.post(f"/engines/r{i}/upgrade", json={"engine_version": "ref-2"})
            singles.append(time.perf_counter() - one)
            assert answer.status_code == 200 and answer.json()["engine_version"] == "ref-2", answer.text
        singles_s = time.perf_counter() - started
        started = time.perf_counter()
        rollout = api.post("/rollouts", json={"to_version": "ref-3", "batch_size": BATCH})
        assert rollout.status_code == 202, rollout.text
        done = wait_for(lambda: _finished(api, rollout.json()["id"]), timeout=1800,
                        interval=0.05, what="the rollout")
        rollout_s = time.perf_counter() - started
        assert (done["status"], done["upgraded"]) == ("succeeded", ENGINES), done
        _check_fleet(api, keys, "ref-3")
        return {"engines": ENGINES, "batch": BATCH, "singles_s": round(singles_s, 2),
                "single_p50_ms": round(statistics.median(singles) * 1000),
                "rollout_s": round(rollout_s, 2), "ratio": round(singles_s / rollout_s, 2)}
    finally:
        orch.close()


async def _provision(orch: Orchestrator, n: int) -> dict[str, str]:
    """n engines on ref-1, 20 at a time, each holding a memory; their keys."""
    keys: dict[str, str] = {}
    limit = asyncio.Semaphore(20)
    async with httpx.AsyncClient(base_url=orch.url, timeout=120, trust_env=False,
                                 headers={"X-Platform-Key": orch.keys["bench"]}) as client:
        async def one(i: int) -> None:
            async with limit:
                answer = await client.post("/engines/provision",
                                           json={"user_id": f"r{i}", "engine_version": "ref-1"})
                assert answer.status_code == 200, answer.text
                engine = answer.json()
                keys[f"r{i}"] = engine["api_key"]
                put = await client.put(engine["url"] + "/v1/memory/me", content=f"r{i}".encode(),
                                       headers={"Authorization": f"Bearer {engine['api_key']}"})
                put.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(n)))
    return keys


def _finished(api: httpx.Client, rollout_id: int) -> dict | None:
    rollout: dict = api.get(f"/rollouts/{rollout_id}").json()
    return rollout if rollout["status"] in FINISHED else None


def _check_fleet(api: httpx.Client, keys: dict[str, str], version: str) -> None:
    with httpx.Client(trust_env=False, timeout=10) as plain:
        for user, key in keys.items():
            engine = api.get(f"/engines/{user}").json()
            assert (engine["status"], engine["engine_version"]) == ("running", version), engine
            auth = {"Authorization": f"Bearer {key}"}
            assert plain.get(engine["url"] + "/v1/info", headers=auth).json()["version"] == version
            assert plain.get(engine["url"] + "/v1/memory/me", headers=auth).content == user.encode()


def lines(r: dict) -> list[str]:
    return [
        f"rollout            {r['engines']} engines in batches of {r['batch']}: {r['rollout_s']} s   "
        f"{r['engines']} single upgrades in a row {r['singles_s']} s (p50 {r['single_p50_ms']} ms "
        f"each)   ({r['ratio']:.1f}x faster)"]


if __name__ == "__main__":
    import tempfile

    print("\n".join(lines(bench_rollout(Path(tempfile.mkdtemp(prefix="orch-rollout-"))))))
