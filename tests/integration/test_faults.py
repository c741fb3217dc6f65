"""SIGKILL the orchestrator in the middle of each operation, start it again, and check that the
registry and the machine agree, with nothing leaked or lost."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.engines import assert_consistent, engine_processes, nothing_left
from tests.harness import Orchestrator, running, wait_for

FAST = {"ORCH_LEASE_S": "1", "ORCH_STOP_GRACE_S": "3", "ORCH_BOOT_TIMEOUT_S": "10"}


@pytest.fixture(params=["local", "nomad"])
def orch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Orchestrator]:
    """Each test on both drivers: local processes, and Nomad (the double, or real agents)."""
    with running(tmp_path, request.param, env=FAST) as orchestrator:
        yield orchestrator


def kill_during(orch: Orchestrator, call: Callable[[httpx.Client], object],
                begun: Callable[[], object], after: float = 0.2) -> None:
    """Start `call`; once the registry shows it has `begun` (and `after` seconds more, for the
    driver to be half-way through), SIGKILL the orchestrator and start a new one. Waiting on
    the registry rather than the clock puts the kill mid-operation however slow the machine."""
    client = orch.client("acme")

    def run() -> None:
        try:
            call(client)
        except httpx.HTTPError:
            pass  # the server died under it: expected

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(begun, timeout=15, what="the operation to begin")
        time.sleep(after)
    finally:
        orch.restart()
        thread.join(timeout=30)
    assert not thread.is_alive()


def status(orch: Orchestrator, user: str) -> str | None:
    row = orch.engine_row(user)
    return row["status"] if row else None


def test_killed_mid_provision(orch: Orchestrator) -> None:
    kill_during(orch, lambda c: c.post("/engines/provision", json={
        "user_id": "p", "engine_version": "ref+boot-delay-1500"}),
        # booting: the driver has reported its state (a new row's driver_state is "{}")
        begun=lambda: json.loads((orch.engine_row("p") or {}).get("driver_state") or "{}"))
    wait_for(lambda: status(orch, "p") == "running", timeout=20, what="provision resumed")
    assert_consistent(orch)
    assert orch.client("acme").post("/engines/p/admit").json()["admitted"]


def test_killed_mid_start(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "s", "engine_version": "ref+boot-delay-1500"})
    api.post("/engines/s/stop")
    kill_during(orch, lambda c: c.post("/engines/s/start"), begun=lambda: status(orch, "s") == "starting")
    wait_for(lambda: status(orch, "s") == "running", timeout=20, what="start resumed")
    assert_consistent(orch)


def test_killed_mid_stop(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "t", "engine_version": "ref+fault-hang-term"})
    kill_during(orch, lambda c: c.post("/engines/t/stop"), begun=lambda: status(orch, "t") == "stopping")
    wait_for(lambda: status(orch, "t") == "stopped", timeout=20, what="stop finished")
    assert_consistent(orch)
    assert engine_processes(orch) == {}


def test_killed_mid_destroy(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "d", "engine_version": "ref+fault-hang-term"})
    kill_during(orch, lambda c: c.delete("/engines/d"), begun=lambda: status(orch, "d") == "destroying")
    wait_for(lambda: orch.engine_row("d") is None, timeout=20, what="destroy finished")
    assert_consistent(orch)
    assert engine_processes(orch) == {}
    events = orch.client("acme").get("/engines/d/events").json()["events"]
    assert events[0]["event"] == "destroyed"


def test_killed_mid_rotate_key(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "r", "engine_version": "ref+hup-delay-2500"})
    kill_during(orch, lambda c: c.post("/engines/r/rotate-key"),
                begun=lambda: orch.engine_row("r")["pending_key_enc"] is not None)
    wait_for(lambda: orch.engine_row("r")["pending_key_enc"] is None, timeout=20,
             what="rotation settled")
    time.sleep(3)  # let the engine's delayed reloads land
    answer = orch.client("acme").post("/engines/r/admit").json()
    check = httpx.get(answer["url"] + "/v1/keycheck", trust_env=False,
                      headers={"Authorization": f"Bearer {answer['api_key']}"})
    assert check.status_code == 200  # the key the registry hands out is the one the engine takes
    assert_consistent(orch)


def test_orphans_are_removed(orch: Orchestrator) -> None:
    """Resources with no row (as a crash could leave) go after the grace period."""
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "o"})
    name = orch.rows("SELECT name FROM engine")[0][0]
    orch.execute("DELETE FROM engine")  # forget the row behind the orchestrator's back
    if orch.driver == "nomad":  # no job, host volume or variable left for that name
        wait_for(lambda: engine_processes(orch) == {} and nothing_left(orch) == {},
                 timeout=20, what="orphan removal")
    else:
        wait_for(lambda: engine_processes(orch) == {} and not (orch.state_dir / "brains" / name).exists()
                 and orch.rows("SELECT * FROM port_lease") == [], timeout=20, what="orphan removal")
    events = orch.rows("SELECT event FROM event WHERE engine_name = ?", name)
    assert ("orphan_removed",) in events
