"""Lifecycle edges on both drivers: hung engines, failing checks, sleep modes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.engines import engine_log, engine_processes, proc_state
from tests.harness import Orchestrator, wait_for


@pytest.fixture(params=["local", "nomad"])
def make_orch(request: pytest.FixtureRequest, tmp_path: Path):
    made: list[Orchestrator] = []

    def make(**env: str) -> Orchestrator:
        orch = Orchestrator(tmp_path / str(len(made)), env=env, driver=request.param)
        made.append(orch)
        orch.start().product("acme")
        return orch

    yield make
    for orch in made:
        orch.close()


def pid_of(orch: Orchestrator, user_id: str) -> int:  # 0 while it has no process
    if orch.driver == "nomad":
        name = orch.engine_row(user_id)["name"]
        return (engine_processes(orch).get(name) or [0])[-1]
    return json.loads(orch.engine_row(user_id)["driver_state"]).get("pid", 0)


def test_stop_kills_an_engine_that_ignores_sigterm(make_orch) -> None:
    orch = make_orch(ORCH_STOP_GRACE_S="0.5")
    api = orch.client("acme")
    assert api.post("/engines/provision", json={"user_id": "stubborn",
                                                 "engine_version": "ref+fault-hang-term"}).status_code == 200
    pid = pid_of(orch, "stubborn")
    assert api.post("/engines/stubborn/stop").json()["status"] == "stopped"
    assert proc_state(pid) == "gone"
    assert "ignoring SIGTERM" in engine_log(orch, "stubborn")  # SIGTERM came first, then SIGKILL


def test_failing_health_check_fails_then_restarts(make_orch) -> None:
    orch = make_orch(ORCH_HEALTH_GRACE_S="0.3")
    api = orch.client("acme")
    engine = api.post("/engines/provision", json={"user_id": "sick"}).json()
    pid = pid_of(orch, "sick")
    r = httpx.post(engine["url"] + "/v1/admin/health", json={"healthy": False},
                   headers={"Authorization": f"Bearer {engine['api_key']}"}, trust_env=False)
    assert r.status_code == 200
    wait_for(lambda: pid_of(orch, "sick") not in (0, pid) and orch.engine_row("sick")["status"] == "running",
             timeout=15, what="restart after failing checks")
    assert proc_state(pid) == "gone"
    events = [(e["event"], e["reason"]) for e in api.get("/engines/sick/events").json()["events"]]
    assert ("fail", "unhealthy") in events and ("start", "restart") in events
    assert api.get("/engines/sick").json()["restarts"] == 1


def test_sleep_mode_stop_cold_starts_on_wake(make_orch) -> None:
    orch = make_orch(ORCH_IDLE_SLEEP_S="0.5", ORCH_SLEEP_MODE="stop")
    api = orch.client("acme")
    key = api.post("/engines/provision", json={"user_id": "napper"}).json()["api_key"]

    def write() -> int:
        # Idle for 0.5 s it sleeps (stops): on a loaded machine that can come before the
        # write, so admit (wake) first. The pid of the engine that took the write, 0: again.
        url = api.post("/engines/napper/admit", json={"auto_wake": True}).json()["url"]
        pid = pid_of(orch, "napper")
        try:
            written = httpx.put(url + "/v1/memory/k", content=b"v", trust_env=False,
                                headers={"Authorization": f"Bearer {key}"}).is_success
        except httpx.TransportError:
            return 0
        return pid if written else 0
    pid = wait_for(write, timeout=30, what="the brain written on a running engine")
    wait_for(lambda: api.get("/engines/napper").json()["status"] == "sleeping", timeout=15,
             what="idle sleep")
    # sleeping is recorded first (an admit meanwhile wakes it), then the process stops
    wait_for(lambda: proc_state(pid) == "gone", timeout=10, what="the engine process to stop")
    wait_for(lambda: api.get("/engines/napper").json()["url"] is None, what="url cleared")
    woken = api.post("/engines/napper/admit", json={"auto_wake": True}).json()
    assert woken["admitted"] and woken["woken"]
    assert pid_of(orch, "napper") != pid

    def brain() -> bytes | None:
        # Idle for 0.5 s it sleeps (stops) again, and the engine's own traffic is not activity:
        # on a loaded machine that can come before this read, so admit (wake) and read again.
        url = api.post("/engines/napper/admit", json={"auto_wake": True}).json()["url"]
        try:
            return httpx.get(url + "/v1/memory/k", headers={"Authorization": f"Bearer {key}"},
                             trust_env=False).content
        except httpx.TransportError:
            return None
    wait_for(lambda: brain() == b"v", timeout=30, what="the brain read after a cold start")


def test_wake_falls_back_to_cold_start_when_the_paused_process_is_gone(make_orch) -> None:
    orch = make_orch(ORCH_IDLE_SLEEP_S="0.5")
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "ghost"})
    pid = pid_of(orch, "ghost")
    wait_for(lambda: api.get("/engines/ghost").json()["status"] == "sleeping", timeout=15,
             what="idle sleep")
    wait_for(lambda: proc_state(pid) == "paused", what="SIGSTOP")
    with contextlib.suppress(ProcessLookupError):  # gone already: the case this test makes
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: proc_state(pid) == "gone", what="kill")
    woken = api.post("/engines/ghost/admit", json={"auto_wake": True}).json()
    assert woken["admitted"] and woken["woken"]
    # A new process, alive (idle for 0.5 s it may already be paused again on a loaded machine).
    assert pid_of(orch, "ghost") != pid and proc_state(pid_of(orch, "ghost")) in ("running", "paused")


def test_start_wakes_a_sleeping_engine_and_admit_counts_as_activity(make_orch) -> None:
    orch = make_orch(ORCH_IDLE_SLEEP_S="1")
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "busy"})
    # steady admits keep it awake past several idle periods
    for _ in range(12):
        assert api.post("/engines/busy/admit").json()["admitted"]
        import time
        time.sleep(0.2)
    assert api.get("/engines/busy").json()["status"] == "running"
    wait_for(lambda: api.get("/engines/busy").json()["status"] == "sleeping", timeout=15,
             what="idle sleep")
    started = api.post("/engines/busy/start")
    assert started.status_code == 200 and started.json()["status"] == "running"
