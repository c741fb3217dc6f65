"""What a product waits for on Nomad: a new user's first admit (auto_provision), a start after a
stop, a wake (admit with auto_wake of a sleeping engine) and a rotate-key, p50 and p90 over
BENCH_NOMAD_WAIT_ROUNDS engines, on the double with a production client's timing and with a
`-dev` agent's, each beside the same figure on the local driver in the same run.

The double runs the engines for real; its timings follow Nomad v1.10.5 (tests/doubles/README.md,
Timing): a new volume waits for its node's next update (5-10 s in production, 1 s on -dev),
evaluations are processed after the register answers, and Consul's first check of a new
service comes after a random stagger within its interval.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from tests.harness import Orchestrator, wait_for

ROUNDS = int(os.environ.get("BENCH_NOMAD_WAIT_ROUNDS", "5"))
SETUPS = (("local", "local", None), ("nomad, -dev timing", "nomad", "dev"),
          ("nomad, production timing", "nomad", "production"))
OPERATIONS = ("first admit", "start after stop", "wake", "rotate-key")


def bench_nomad_waits(tmp: Path) -> dict[str, Any]:
    return {label: _measure(tmp / f"{driver}-{timing}", driver, timing)
            for label, driver, timing in SETUPS}


def _measure(tmp: Path, driver: str, timing: str | None) -> dict[str, dict[str, float]]:
    if timing:
        os.environ["ORCH_TEST_DOUBLE_TIMING"] = timing   # read by tests/scheduler.py
    env = {"ORCH_BOOT_TIMEOUT_S": "60", "ORCH_IDLE_SLEEP_S": "1", "ORCH_TICK_S": "0.1",
           "ORCH_LOG_LEVEL": "WARNING"}
    orch = Orchestrator(tmp, env=env, driver=driver, ports=50).start()
    samples: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    try:
        orch.product("bench", max_engines=1000, rpm=1_000_000_000)
        api = orch.client("bench", timeout=90)
        for i in range(ROUNDS):
            _round(api, f"w{i}", samples)
    finally:
        orch.close()
        os.environ.pop("ORCH_TEST_DOUBLE_TIMING", None)
    return {op: _pct(values) for op, values in samples.items()}


def _round(api: httpx.Client, user: str, samples: dict[str, list[float]]) -> None:
    answer = _timed(samples["first admit"], api.post, f"/engines/{user}/admit",
                    json={"auto_provision": True})
    assert answer.json().get("provisioned"), answer.text
    _timed(samples["rotate-key"], api.post, f"/engines/{user}/rotate-key")
    wait_for(lambda: api.get(f"/engines/{user}").json()["status"] == "sleeping", timeout=20,
             interval=0.02, what="idle sleep")
    answer = _timed(samples["wake"], api.post, f"/engines/{user}/admit", json={"auto_wake": True})
    assert answer.json().get("woken"), answer.text
    assert api.post(f"/engines/{user}/stop").status_code == 200
    _timed(samples["start after stop"], api.post, f"/engines/{user}/start")
    assert api.delete(f"/engines/{user}").status_code == 200


def _timed(into: list[float], call: Any, *args: Any, **kwargs: Any) -> httpx.Response:
    started = time.perf_counter()
    answer: httpx.Response = call(*args, **kwargs)
    into.append(time.perf_counter() - started)
    assert answer.status_code == 200, answer.text
    return answer


def _pct(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_s": round(statistics.median(ordered), 2),
            "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2)}


def lines(result: dict[str, Any]) -> list[str]:
    out = [f"nomad waits ({ROUNDS} engines each)   p50 / p90 seconds"]
    for op in OPERATIONS:
        cells = [f"{label} {result[label][op]['p50_s']:.2f} / {result[label][op]['p90_s']:.2f}"
                 for label, _, _ in SETUPS if label in result]
        out.append(f"  {op:<17} " + "   ".join(cells))
    return out
