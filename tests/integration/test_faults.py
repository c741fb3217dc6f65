"""SIGKILL the orchestrator in the middle of each operation, start it again, and check that the
registry and the machine agree, with nothing leaked or lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from tests.engines import assert_consistent, engine_processes
from tests.harness import Orchestrator, wait_for

FAST = {"ORCH_LEASE_S": "1", "ORCH_STOP_GRACE_S": "3", "ORCH_BOOT_TIMEOUT_S": "10"}


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[Orchestrator]:
    orchestrator = Orchestrator(tmp_path, env=FAST).start()
    orchestrator.product("acme")
    try:
        yield orchestrator
    finally:
        orchestrator.close()


def kill_during(orch: Orchestrator, call: Callable[[httpx.Client], object], after: float) -> None:
    """Start `call`, SIGKILL the orchestrator `after` seconds in, start a new one."""
    client = orch.client("acme")

    def run() -> None:
        try:
            call(client)
        except httpx.HTTPError:
            pass  # the server died under it: expected

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(after)
    orch.restart()
    thread.join(timeout=30)


def status(orch: Orchestrator, user: str) -> str | None:
    row = orch.engine_row(user)
    return row["status"] if row else None


def test_killed_mid_provision(orch: Orchestrator) -> None:
    kill_during(orch, lambda c: c.post("/engines/provision", json={
        "user_id": "p", "engine_version": "ref+boot-delay-1500"}), after=0.5)
    wait_for(lambda: status(orch, "p") == "running", timeout=20, what="provision resumed")
    assert_consistent(orch)
    assert orch.client("acme").post("/engines/p/admit").json()["admitted"]


def test_killed_mid_start(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "s", "engine_version": "ref+boot-delay-1500"})
    api.post("/engines/s/stop")
    kill_during(orch, lambda c: c.post("/engines/s/start"), after=0.5)
    wait_for(lambda: status(orch, "s") == "running", timeout=20, what="start resumed")
    assert_consistent(orch)


def test_killed_mid_stop(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "t", "engine_version": "ref+fault-hang-term"})
    kill_during(orch, lambda c: c.post("/engines/t/stop"), after=0.5)
    wait_for(lambda: status(orch, "t") == "stopped", timeout=20, what="stop finished")
    assert_consistent(orch)
    assert engine_processes(orch) == {}


def test_killed_mid_destroy(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "d", "engine_version": "ref+fault-hang-term"})
    kill_during(orch, lambda c: c.delete("/engines/d"), after=0.5)
    wait_for(lambda: orch.engine_row("d") is None, timeout=20, what="destroy finished")
    assert_consistent(orch)
    assert engine_processes(orch) == {}
    events = orch.client("acme").get("/engines/d/events").json()["events"]
    assert events[0]["event"] == "destroyed"


def test_killed_mid_rotate_key(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "r", "engine_version": "ref+hup-delay-2500"})
    kill_during(orch, lambda c: c.post("/engines/r/rotate-key"), after=0.5)
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
    wait_for(lambda: engine_processes(orch) == {} and not (orch.state_dir / "brains" / name).exists()
             and orch.rows("SELECT * FROM port_lease") == [], timeout=20, what="orphan removal")
    events = orch.rows("SELECT event FROM event WHERE engine_name = ?", name)
    assert ("orphan_removed",) in events
