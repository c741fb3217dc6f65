"""The fleet's figures: the orchestrator at rest with a fleet of running engines, and how soon
a killed engine is `failed`.

- CPU at rest: N engines (BENCH_FLEET_N, default 1000; each its own process, the bench's
  minimal engine) running, nothing calling the API; the orchestrator's CPU over
  BENCH_FLEET_SECONDS. Baseline in the same run, on the same fleet (the orchestrator restarted
  and adopting it): ORCH_HEALTH_INTERVAL_S = ORCH_TICK_S = 1, every engine probed every tick
  (no spread schedule, no exit events). And two replicas together, beside one alone.
- the same orchestrator before the fleet, with no engine: what it costs at rest anyway (its
  timers and periodic queries), so the fleet's own share can be told apart.
- admit throughput against the bare endpoint (tests/bench/bare.py, the admit bench's
  baseline), as the median ratio over BENCH_ROUNDS alternating rounds: with 1 engine running,
  then with the whole fleet running (the target: within 10% of each other).
- database queries per second at rest, in the same windows (every statement the orchestrator
  processes start on SQLite, counted by tests/bench/querycount/sitecustomize.py, which only
  the bench puts on their PYTHONPATH).
- crash to failed: BENCH_FLEET_KILLS engines SIGKILLed one at a time; the delay from the kill
  to the `fail` audit event's timestamp (written by the orchestrator, so no polling here).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.harness import ROOT, Orchestrator, wait_for

N = int(os.environ.get("BENCH_FLEET_N", "1000"))
SECONDS = float(os.environ.get("BENCH_FLEET_SECONDS", "20"))
KILLS = int(os.environ.get("BENCH_FLEET_KILLS", "40"))
ENGINE_CMD = f"{sys.executable} -S {ROOT / 'tests' / 'bench' / 'tiny_engine.py'}"


def bench_fleet(tmp: Path) -> dict:
    env = {"ORCH_ENGINE_CMD": ENGINE_CMD, "ORCH_LOG_LEVEL": "WARNING", "ORCH_TICK_S": "1",
           "ORCH_HEALTH_INTERVAL_S": "10", "ORCH_RESYNC_S": "60", "ORCH_IDLE_SLEEP_S": "0",
           "ORCH_MAX_RESTARTS": "0", "ORCH_BOOT_TIMEOUT_S": "60", "ORCH_STOP_GRACE_S": "1"}
    env.update(PYTHONPATH=f"{ROOT}:{ROOT / 'tests' / 'bench' / 'querycount'}",
               BENCH_QUERY_COUNT_FILE=str(tmp / "queries"))
    orch = Orchestrator(tmp, env=env, ports=N + 100).start()
    orch.product("bench", max_engines=1_000_000, rpm=1_000_000_000)
    try:
        empty, empty_queries = _at_rest(tmp, orch)
        n = asyncio.run(_provision(orch, 1))
        admit_one = _admit_ratio(orch, "f0")
        started = time.monotonic()
        n = asyncio.run(_provision(orch, N, first=1)) + n
        provisioned_s = time.monotonic() - started
        time.sleep(3.0)  # the provisioning's after-effects settle
        ours, queries = _at_rest(tmp, orch)
        admit_fleet = _admit_ratio(orch, "f0")
        second = orch.replica()  # the shards are shared out within a heartbeat or two
        try:
            # Then each replica's first checks of the engines it gained open their connections,
            # over one health interval: rest is after that.
            time.sleep(5.0 + float(env["ORCH_HEALTH_INTERVAL_S"]) * 1.2)
            pair, pair_queries = _at_rest(tmp, orch, second)
        finally:
            second.kill(signal.SIGTERM)
        crash = _crash_detection(orch)
        # The baseline: the same fleet, every engine probed every tick (the old reconciler).
        orch.kill(signal.SIGTERM)  # a clean stop hands its shards back at once
        orch.env.update(ORCH_HEALTH_INTERVAL_S="1")
        orch.start()
        time.sleep(3.0)
        old, old_queries = _at_rest(tmp, orch)
        return {"n": n, "provisioned_s": round(provisioned_s, 1), "cpu_pct": ours,
                "old_cpu_pct": old, "pair_cpu_pct": pair, "crash": crash, "kills": KILLS,
                "queries_per_s": queries, "old_queries_per_s": old_queries,
                "pair_queries_per_s": pair_queries, "empty_cpu_pct": empty,
                "empty_queries_per_s": empty_queries, "admit_one": admit_one,
                "admit_fleet": admit_fleet}
    finally:
        orch.close()


async def _provision(orch: Orchestrator, n: int, first: int = 0) -> int:
    """Provision n engines; return how many run. On a shared machine another program can take
    a port between the driver's check and the engine's bind: that engine fails and is counted
    out rather than stopping the bench."""
    async with httpx.AsyncClient(base_url=orch.url, trust_env=False, timeout=120,
                                 headers={"X-Platform-Key": orch.keys["bench"]}) as client:
        semaphore = asyncio.Semaphore(8)

        async def one(i: int) -> bool:
            async with semaphore:
                answer = await client.post("/engines/provision", json={"user_id": f"f{i}"})
                return answer.status_code == 200

        return sum(await asyncio.gather(*(one(i) for i in range(first, n))))


def _at_rest(tmp: Path, *replicas: Orchestrator) -> tuple[float, float]:
    """Percent of one core the orchestrator processes used together over SECONDS of rest, and
    the database queries they started per second meanwhile."""
    from tests.bench.__main__ import _cpu_seconds

    pids = [r.proc.pid for r in replicas if r.proc is not None]
    before, at = sum(map(_cpu_seconds, pids)), time.monotonic()
    counted = [_queries(tmp, pid) for pid in pids]
    time.sleep(SECONDS)
    cpu = round(100 * (sum(map(_cpu_seconds, pids)) - before) / (time.monotonic() - at), 2)
    rate = sum((n - n0) / max(t - t0, 1e-9) for (t0, n0), (t, n) in
               zip(counted, (_queries(tmp, pid) for pid in pids), strict=True))
    return cpu, round(rate, 1)


def _admit_ratio(orch: Orchestrator, user: str) -> dict:
    """Admit of a running engine against the bare endpoint, as the admit bench measures it."""
    from tests.bench.__main__ import CONNECTIONS, ROUNDS, _admit_target, _listening, _timed_round
    from tests.bench.__main__ import SECONDS as ADMIT_SECONDS
    from tests.bench.loadgen import Target, run_in_process
    from tests.harness import free_port

    port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "tests.bench.bare", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), timeout=15, what="bare baseline")
        target = _admit_target(orch, user)
        bare_target = Target("127.0.0.1", port, "POST", f"/engines/{user}/admit", {}, b"{}")
        for warm in (target, bare_target):
            run_in_process("saturate", warm, connections=CONNECTIONS, seconds=1.0)
        seconds = max(1.0, ADMIT_SECONDS / ROUNDS)
        assert orch.proc is not None
        rounds = [(_timed_round(orch.proc.pid, target, seconds), _timed_round(bare.pid, bare_target, seconds))
                  for _ in range(ROUNDS)]
    finally:
        bare.kill()
        bare.wait()
    ratios = sorted(o["rps"] / b["rps"] for o, b in rounds)
    return {"ratio": round(statistics.median(ratios), 2), "ratios": [round(r, 2) for r in ratios],
            "rps": round(statistics.median(o["rps"] for o, _ in rounds)),
            "errors": sum(o["errors"] for o, _ in rounds)}


def _queries(tmp: Path, pid: int) -> tuple[float, int]:
    """(when, how many queries) as the counter in process `pid` last wrote them."""
    path = tmp / f"queries.{pid}"
    wait_for(path.exists, timeout=10, what=f"the query count of {pid}")
    at, count = path.read_text().split()
    return float(at), int(count)


def _crash_detection(orch: Orchestrator) -> dict:
    running = orch.rows("SELECT user_id, driver_state FROM engine WHERE status = 'running'")
    victims = random.Random(11).sample(running, min(KILLS, len(running)))
    return time_kills(orch, [(user, json.loads(state)["pid"]) for user, state in victims],
                      gap_s=0.25, timeout=60)


def time_kills(orch: Orchestrator, victims: list[tuple[str, int]], gap_s: float,
               timeout: float) -> dict:
    """SIGKILL each (user, pid) `gap_s` apart, each its own measurement, and time each to its
    engine's `fail` audit event: p50, p99 and max in ms."""
    killed: dict[str, float] = {}
    for user, pid in victims:
        killed[user] = time.time()
        os.kill(pid, signal.SIGKILL)
        time.sleep(gap_s)
    marks = ",".join("?" * len(killed))

    def fails() -> list[tuple[str, float]]:
        return [(str(u), float(t)) for u, t in orch.rows(
            f"SELECT user_id, MIN(at) FROM event WHERE event = 'fail' AND user_id IN ({marks}) "
            f"GROUP BY user_id", *killed)]

    wait_for(lambda: len(fails()) == len(killed), timeout=timeout, interval=0.2,
             what="every kill noticed")
    delays = sorted(at - killed[user] for user, at in fails())
    return {"p50_ms": round(statistics.median(delays) * 1000, 1),
            "p99_ms": round(delays[min(len(delays) - 1, int(0.99 * len(delays)))] * 1000, 1),
            "max_ms": round(delays[-1] * 1000, 1)}


def lines(f: dict) -> list[str]:
    c = f["crash"]
    return [
        f"fleet at rest      {f['n']} engines running: orchestrator {f['cpu_pct']}% of a core   "
        f"probing every engine every tick (as before): {f['old_cpu_pct']}%   "
        f"(target < 2% per 1,000)",
        f"                   the same orchestrator with no engine yet: {f['empty_cpu_pct']}%   "
        f"so the fleet's own share: {round(f['cpu_pct'] - f['empty_cpu_pct'], 2)}%",
        f"database at rest   {f['queries_per_s']} queries/s   probing every engine every tick: "
        f"{f['old_queries_per_s']}/s   two replicas together: {f['pair_queries_per_s']}/s   "
        f"no engine: {f['empty_queries_per_s']}/s",
        f"admit vs bare      with {f['n']} engines running: {f['admit_fleet']['ratio']} "
        f"(rounds {f['admit_fleet']['ratios']}, {f['admit_fleet']['rps']} req/s)   with 1 engine: "
        f"{f['admit_one']['ratio']} (rounds {f['admit_one']['ratios']}, {f['admit_one']['rps']} req/s)   "
        f"(target: within 10%)",
        f"two replicas       together {f['pair_cpu_pct']}% of a core at rest, beside one alone "
        f"{f['cpu_pct']}%   (target: the same)",
        f"crash -> failed    p50 {c['p50_ms']} ms   p99 {c['p99_ms']} ms   max {c['max_ms']} ms   "
        f"over {f['kills']} SIGKILLs among {f['n']} engines   (target p50 < 1 s, p99 < 2 s)"]


if __name__ == "__main__":
    import tempfile

    result = bench_fleet(Path(tempfile.mkdtemp(prefix="orch-fleet-")))
    print("\n".join(lines(result)))
