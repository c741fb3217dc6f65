"""The warm pool's figures, each beside the same figure with no pool, in the same run, on the
local driver and on the Nomad double at a production client's timing (BENCH_POOL_NOMAD_TIMING,
`production` or `dev`).

- first admit: a new user's first admit (auto_provision), p50 and p90 over BENCH_POOL_ROUNDS
  (10) users, from a full pool of BENCH_POOL_N (10), alternating with a new user of a product
  with no pool (a cold provision), so that load from elsewhere falls on both;
- burst: 3N new users at once against a full pool of N: how many were served from the pool,
  the p50 of each group, and how long from the burst's end until the pool was full again.

Run alone: `BENCH_ONLY=pool make bench` (a few minutes on a small machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from tests.harness import Orchestrator, wait_for

N = int(os.environ.get("BENCH_POOL_N", "10"))
ROUNDS = int(os.environ.get("BENCH_POOL_ROUNDS", "10"))
DRIVERS = tuple(d for d in os.environ.get("BENCH_POOL_DRIVERS", "local,nomad").split(",") if d)


TIMING = os.environ.get("BENCH_POOL_NOMAD_TIMING", "production")


def bench_pool(tmp: Path) -> dict[str, Any]:
    # The integration harness serves the double a -dev agent's timing unless told otherwise.
    os.environ["ORCH_TEST_DOUBLE_TIMING"] = TIMING   # read by tests/scheduler.py
    try:
        return {driver: _one(tmp / driver, driver) for driver in DRIVERS}
    finally:
        os.environ.pop("ORCH_TEST_DOUBLE_TIMING", None)


def _one(tmp: Path, driver: str) -> dict[str, Any]:
    env = {"ORCH_LOG_LEVEL": "WARNING", "ORCH_BOOT_TIMEOUT_S": "60", "ORCH_IDLE_SLEEP_S": "0",
           "ORCH_HEALTH_INTERVAL_S": "5"}
    orch = Orchestrator(tmp, env=env, ports=6 * N + ROUNDS * 2 + 20, driver=driver).start()
    try:
        for name, size in (("warm", N), ("cold", 0)):
            out = orch.cli("products", "create", name, "--max-engines", "100000",
                           "--rate-limit-rpm", "1000000000", "--warm-pool", str(size))
            orch.keys[name] = json.loads(out.stdout)["platform_key"]
        _full(orch)
        warm, cold = [], []
        with orch.client("warm", timeout=120) as w, orch.client("cold", timeout=120) as c:
            for i in range(ROUNDS):
                _full(orch)
                warm.append(_timed_admit(w, f"first-{i}", expect_pool=True))
                cold.append(_timed_admit(c, f"first-{i}", expect_pool=False))
        _full(orch)
        burst = asyncio.run(_burst(orch, 3 * N))
        ended = time.perf_counter()
        _full(orch, timeout=300)
        burst["refill_s"] = round(time.perf_counter() - ended, 2)
        return {"warm": _pct(warm), "cold": _pct(cold), "burst": burst}
    finally:
        orch.close()


def _full(orch: Orchestrator, timeout: float = 120) -> None:
    def full() -> bool:
        return orch.rows("SELECT COUNT(*) FROM engine WHERE in_pool AND status IN "
                         "('running', 'sleeping')")[0][0] == N
    wait_for(full, timeout=timeout, interval=0.05, what="the pool to be full")


def _timed_admit(client: httpx.Client, user: str, expect_pool: bool) -> float:
    started = time.perf_counter()
    answer = client.post(f"/engines/{user}/admit", json={"auto_provision": True}).json()
    elapsed = time.perf_counter() - started
    assert answer["admitted"] and answer["from_pool"] is expect_pool, answer
    return elapsed


async def _burst(orch: Orchestrator, users: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=orch.url, timeout=300, trust_env=False,
                                 headers={"X-Platform-Key": orch.keys["warm"]},
                                 limits=httpx.Limits(max_connections=users)) as client:
        async def one(i: int) -> tuple[bool, float]:
            started = time.perf_counter()
            answer = (await client.post(f"/engines/burst-{i}/admit",
                                        json={"auto_provision": True})).json()
            assert answer["admitted"], answer
            return bool(answer["from_pool"]), time.perf_counter() - started

        results = await asyncio.gather(*(one(i) for i in range(users)))
    pooled = [s for p, s in results if p]
    cold = [s for p, s in results if not p]
    return {"users": users, "from_pool": len(pooled), "pool_p50_ms": _ms(pooled),
            "cold_p50_ms": _ms(cold)}


def _ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1) if samples else 0.0


def _pct(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": _ms(ordered),
            "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000, 1)}


def lines(r: dict[str, Any]) -> list[str]:
    out = []
    for driver, f in r.items():
        target = "10 ms" if driver == "local" else f"50 ms; {TIMING} timing"
        b = f["burst"]
        out += [f"pool first admit ({driver:5}) from the pool p50 {f['warm']['p50_ms']} ms  "
                f"p90 {f['warm']['p90_ms']} ms   no pool p50 {f['cold']['p50_ms']} ms  "
                f"p90 {f['cold']['p90_ms']} ms   (target p50 < {target})",
                f"pool burst ({driver:5})       {b['users']} new users, pool of {N}: "
                f"{b['from_pool']} from the pool (p50 {b['pool_p50_ms']} ms), "
                f"{b['users'] - b['from_pool']} cold (p50 {b['cold_p50_ms']} ms); "
                f"pool full again {b['refill_s']} s after"]
    return out
