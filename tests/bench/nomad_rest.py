"""The orchestrator's CPU at rest on the Nomad driver, with a fleet of running
engines on the Nomad+Consul double (tests/bench/nomad_fleet.py runs it in `make bench`).

BENCH_NOMAD_REST_N engines (default 1,000), each the bench's tiny engine
(tests/bench/tiny_engine.py, its own process) run by the double's raw_exec from the bench job
template (tests/bench/nomad_tiny_engine.json: the raw_exec template's job with the tiny engine
as its command, and a 10 s Consul check interval instead of 1 s, so that the double, which runs
every check itself on this machine, stays at a few percent of a core; a real Consul agent runs
them on the engines' nodes, and at rest its answers do not change either way). Measured over
BENCH_FLEET_SECONDS each, in one run:
- the orchestrator with no engine yet (its timers and periodic queries);
- the fleet running, nothing calling the API: the orchestrator's CPU and its database queries
  per second (tests/bench/querycount), and the double's own CPU beside it;
- the same fleet with the event follower off (ORCH_NOMAD_EVENTS=off: every scheduled check
  from the fleet snapshot, two listings a pass).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

from tests.bench.fleet import SECONDS, _queries
from tests.harness import ROOT, Orchestrator

REST_N = int(os.environ.get("BENCH_NOMAD_REST_N", "1000"))
TEMPLATE = ROOT / "tests" / "bench" / "nomad_tiny_engine.json"
# Provisions in flight: each waits ~10 s for its first passing Consul check (the template's
# interval), so many at once keep 1,000 within a few minutes.
CONCURRENCY = int(os.environ.get("BENCH_NOMAD_REST_CONCURRENCY", "64"))


def bench_rest(tmp: Path) -> dict:
    env = {"ORCH_LOG_LEVEL": "WARNING", "ORCH_TICK_S": "1", "ORCH_HEALTH_INTERVAL_S": "10",
           "ORCH_RESYNC_S": "60", "ORCH_NOMAD_EVENTS": "on", "ORCH_IDLE_SLEEP_S": "0",
           "ORCH_MAX_RESTARTS": "0", "ORCH_BOOT_TIMEOUT_S": "120", "ORCH_STOP_GRACE_S": "1",
           "PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'bench' / 'querycount'}",
           "BENCH_QUERY_COUNT_FILE": str(tmp / "queries")}
    orch = Orchestrator(tmp, driver="nomad", env=env, ports=REST_N + 100)
    orch.env["ORCH_NOMAD_JOBSPEC"] = str(TEMPLATE)   # after the double's own settings
    orch.start()
    orch.product("bench", max_engines=1_000_000, rpm=1_000_000_000)
    try:
        empty = _window(tmp, orch)
        started = time.monotonic()
        asyncio.run(provision(orch, REST_N, "r", CONCURRENCY))
        provisioned_s = time.monotonic() - started
        # The provisions' after-effects settle, and every engine gets its first scheduled
        # check (each within one health interval of its start).
        time.sleep(12.0)
        n = _running(orch)
        ours = _window(tmp, orch)
        orch.kill(signal.SIGTERM)
        orch.env.update(ORCH_NOMAD_EVENTS="off")   # the same fleet, every check a snapshot's
        orch.start()
        time.sleep(12.0)
        snapshot = _window(tmp, orch)
        return {"n": n, "n_after": _running(orch), "asked": REST_N,
                "provisioned_s": round(provisioned_s, 1),
                "empty": empty, "ours": ours, "snapshot": snapshot}
    finally:
        orch.close()


async def provision(orch: Orchestrator, n: int, prefix: str, concurrency: int) -> int:
    """Provision n engines, `concurrency` at a time; how many run."""
    async with httpx.AsyncClient(base_url=orch.url, trust_env=False, timeout=180,
                                 headers={"X-Platform-Key": orch.keys["bench"]}) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> bool:
            async with semaphore:
                answer = await client.post("/engines/provision", json={"user_id": f"{prefix}{i}"})
                return answer.status_code == 200

        return sum(await asyncio.gather(*(one(i) for i in range(n))))


def _running(orch: Orchestrator) -> int:
    return int(orch.rows("SELECT COUNT(*) FROM engine WHERE status = 'running'")[0][0])


def _window(tmp: Path, orch: Orchestrator) -> dict:
    """Over SECONDS: percent of a core the orchestrator and the double used, and the
    orchestrator's database queries per second."""
    from tests.bench.__main__ import _cpu_seconds

    assert orch.proc is not None and orch.stack is not None and orch.stack.proc is not None
    pids = (orch.proc.pid, orch.stack.proc.pid)
    (t0, q0), before, at = _queries(tmp, pids[0]), [_cpu_seconds(p) for p in pids], time.monotonic()
    time.sleep(SECONDS)
    cpu = [round(100 * (_cpu_seconds(p) - b) / (time.monotonic() - at), 2)
           for p, b in zip(pids, before, strict=True)]
    t1, q1 = _queries(tmp, pids[0])
    return {"cpu_pct": cpu[0], "double_pct": cpu[1],
            "queries_per_s": round((q1 - q0) / max(t1 - t0, 1e-9), 1)}


def lines(r: dict) -> list[str]:
    o, e, s = r["ours"], r["empty"], r["snapshot"]
    return [
        f"nomad at rest      {r['n']} engines running (of {r['asked']} provisioned, in "
        f"{r['provisioned_s']} s; {r['n_after']} at the end): orchestrator {o['cpu_pct']}% of "
        f"a core   the fleet snapshot "
        f"every pass (ORCH_NOMAD_EVENTS=off, as before): {s['cpu_pct']}%   no engine: "
        f"{e['cpu_pct']}%   so the fleet's own share: {round(o['cpu_pct'] - e['cpu_pct'], 2)}%   "
        f"(target < 2% per 1,000)",
        f"nomad database     {o['queries_per_s']} queries/s at rest   snapshot every pass: "
        f"{s['queries_per_s']}/s   no engine: {e['queries_per_s']}/s   (the double itself: "
        f"{o['double_pct']}% of a core, {s['double_pct']}%, {e['double_pct']}%)"]


if __name__ == "__main__":
    import tempfile

    print("\n".join(lines(bench_rest(Path(tempfile.mkdtemp(prefix="orch-nomad-rest-"))))))
