"""The fleet's figures on the Nomad driver, against the Nomad+Consul double.

- crash to failed: how soon a killed engine is `failed`, with the event stream and Consul's
  blocking queries (ORCH_NOMAD_EVENTS=on) beside the baseline in the same run: no events, every
  engine probed every tick (ORCH_NOMAD_EVENTS=off, ORCH_HEALTH_INTERVAL_S=1).
  BENCH_NOMAD_N engines (default 20: each a reference engine, a Python process of its own
  in the double) and BENCH_NOMAD_KILLS SIGKILLs (default 10), one at a time; the delay runs
  from the kill to the `fail` audit event's timestamp.
- CPU at rest (tests/bench/nomad_rest.py): BENCH_NOMAD_REST_N running engines (default 1,000),
  each the bench's tiny engine in its own process, run by the double's raw_exec from the bench
  job template; the orchestrator's CPU and database queries per second over
  BENCH_FLEET_SECONDS, beside the same orchestrator with no engine yet and the same fleet
  with the event follower off (every check from the fleet snapshot).

The figures measured are in README.md ("Figures").
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path

from tests.bench import nomad_rest
from tests.bench.fleet import time_kills
from tests.bench.nomad_rest import provision
from tests.harness import Orchestrator

N = int(os.environ.get("BENCH_NOMAD_N", "20"))
KILLS = int(os.environ.get("BENCH_NOMAD_KILLS", "10"))


def bench_nomad(tmp: Path) -> dict:
    return {"n": N, "kills": KILLS, "rest": nomad_rest.bench_rest(tmp / "rest"),
            "events": _crash_detection(tmp / "events", "on", "10"),
            "polling": _crash_detection(tmp / "polling", "off", "1")}


def _crash_detection(tmp: Path, events: str, interval: str) -> dict:
    env = {"ORCH_LOG_LEVEL": "WARNING", "ORCH_TICK_S": "1", "ORCH_HEALTH_INTERVAL_S": interval,
           "ORCH_RESYNC_S": "60", "ORCH_NOMAD_EVENTS": events, "ORCH_IDLE_SLEEP_S": "0",
           "ORCH_MAX_RESTARTS": "0", "ORCH_BOOT_TIMEOUT_S": "60", "ORCH_STOP_GRACE_S": "1"}
    orch = Orchestrator(tmp, driver="nomad", env=env, ports=N + 20).start()
    orch.product("bench", max_engines=10_000, rpm=1_000_000_000)
    try:
        asyncio.run(provision(orch, N, "n", concurrency=4))
        time.sleep(2.0)
        pids = {a["id"]: a["pids"].get("engine") for a in orch.stack.state()["allocs"]}
        running = [(user, pids.get(json.loads(state)["alloc"])) for user, state in
                   orch.rows("SELECT user_id, driver_state FROM engine WHERE status = 'running'")]
        victims = random.Random(11).sample([v for v in running if v[1]], min(KILLS, len(running)))
        return time_kills(orch, victims, gap_s=0.5, timeout=90)
    finally:
        orch.close()


def lines(f: dict) -> list[str]:
    e, p = f["events"], f["polling"]
    return [*nomad_rest.lines(f["rest"]),
            f"nomad crash -> failed  events: p50 {e['p50_ms']} ms  p99 {e['p99_ms']} ms   "
            f"no events, every engine probed every tick (as before): p50 {p['p50_ms']} ms  "
            f"p99 {p['p99_ms']} ms   over {f['kills']} SIGKILLs among {f['n']} engines on the "
            f"double   (target p50 < 1 s, p99 < 2 s)"]


if __name__ == "__main__":
    import tempfile

    print("\n".join(lines(bench_nomad(Path(tempfile.mkdtemp(prefix="orch-nomad-bench-"))))))
