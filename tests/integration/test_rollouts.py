"""Rollouts: a product's engines moved batch by batch, on both drivers, with real
engines. Every test ends by reading each engine's brain back with its key."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import Client, NotFound
from tests.harness import Orchestrator, wait_for

FINISHED = {"succeeded", "failed", "rolled_back", "aborted"}


@pytest.fixture(params=["local", "nomad"])
def orch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Orchestrator]:
    orchestrator = Orchestrator(tmp_path, env={"ORCH_BOOT_TIMEOUT_S": "4"}, driver=request.param,
                                ports=30)
    try:
        orchestrator.start().product("acme")
        yield orchestrator
        if orchestrator.stack is not None:
            assert orchestrator.stack.rejections() == [], "the double refused a driver request"
    finally:
        orchestrator.close()


def fleet(api: httpx.Client, count: int, version: str = "ref-1") -> dict[str, str]:
    """`count` running engines on `version`, each holding its own memory; user -> key."""
    keys = {}
    for i in range(count):
        user = f"u{i}"
        engine = api.post("/engines/provision", json={"user_id": user, "engine_version": version})
        assert engine.status_code == 200, engine.text
        keys[user] = engine.json()["api_key"]
        put = httpx.put(engine.json()["url"] + "/v1/memory/me", content=user.encode(),
                        headers={"Authorization": f"Bearer {keys[user]}"}, trust_env=False)
        assert put.is_success
    return keys


def assert_brains(api: httpx.Client, keys: dict[str, str], version: str) -> None:
    for user, key in keys.items():
        engine = api.get(f"/engines/{user}").json()
        assert (engine["status"], engine["engine_version"]) == ("running", version), engine
        got = httpx.get(engine["url"] + "/v1/memory/me", headers={"Authorization": f"Bearer {key}"},
                        trust_env=False)
        assert got.content == user.encode()


def finished(api: httpx.Client, rollout_id: int, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get(f"/rollouts/{rollout_id}").json()
        return body if body["status"] in FINISHED else None

    result: dict[str, Any] = wait_for(done, timeout=timeout, interval=0.2, what="the rollout")
    return result


def upgrade_window(api: httpx.Client, user: str) -> tuple[int, int]:
    """Event ids of the engine's `upgrade` and `upgraded` (ids grow with time, globally)."""
    events = {e["event"]: e["id"] for e in api.get(f"/engines/{user}/events").json()["events"]}
    return events["upgrade"], events["upgraded"]


def test_a_ten_engine_rollout_in_batches_of_three_reaches_every_engine(orch: Orchestrator) -> None:
    api = orch.client("acme", timeout=60)
    keys = fleet(api, 10)
    started = api.post("/rollouts", json={"to_version": "ref-2", "batch_size": 3})
    assert started.status_code == 202, started.text
    assert started.json()["total"] == 10 and started.json()["status"] == "running"
    done = finished(api, started.json()["id"])
    assert (done["status"], done["upgraded"], done["failed"]) == ("succeeded", 10, 0), done
    assert_brains(api, keys, "ref-2")
    # A batch starts only once the one before it is healthy (upgraded).
    windows = [upgrade_window(api, f"u{i}") for i in range(10)]
    batches = [windows[i:i + 3] for i in range(0, 10, 3)]
    for before, after in itertools.pairwise(batches):
        assert max(end for _, end in before) < min(start for start, _ in after)
    assert [r["id"] for r in api.get("/rollouts").json()["rollouts"]] == [done["id"]]


def test_too_many_failures_stop_the_rollout_and_roll_it_back(orch: Orchestrator) -> None:
    api = orch.client("acme", timeout=60)
    keys = fleet(api, 4)
    started = api.post("/rollouts", json={"to_version": "ref-2+fault-never-healthy",
                                          "batch_size": 2, "max_failures": 1}).json()
    done = finished(api, started["id"])
    assert (done["status"], done["failed"], done["upgraded"]) == ("rolled_back", 2, 0), done
    assert {f["user_id"] for f in done["failures"]} == {"u0", "u1"}
    assert all("UPGRADE_FAILED" in f["reason"] for f in done["failures"])
    assert_brains(api, keys, "ref-1")  # the failed ones went back; the others were never touched
    untouched = [e["event"] for e in api.get("/engines/u3/events").json()["events"]]
    assert "upgrade" not in untouched


def test_pause_resume_abort_and_bad_requests(orch: Orchestrator) -> None:
    api = orch.client("acme", timeout=60)
    keys = fleet(api, 3)
    rollout = api.post("/rollouts", json={"to_version": "ref-2", "from_version": "ref-1"}).json()
    paused = api.post(f"/rollouts/{rollout['id']}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert api.post(f"/rollouts/{rollout['id']}/pause").json()["status"] == "paused"  # idempotent
    at_pause = api.get(f"/rollouts/{rollout['id']}").json()["upgraded"]
    assert at_pause <= 1  # at most the batch under way when it was paused
    resumed = api.post(f"/rollouts/{rollout['id']}/resume").json()
    assert resumed["status"] == "running"
    assert finished(api, rollout["id"])["status"] == "succeeded"
    assert_brains(api, keys, "ref-2")
    for bad in (f"/rollouts/{rollout['id']}/pause", f"/rollouts/{rollout['id']}/abort"):
        answer = api.post(bad)
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "ROLLOUT_FINISHED"

    aborted = api.post("/rollouts", json={"to_version": "ref-3"}).json()
    api.post(f"/rollouts/{aborted['id']}/pause")
    gone = api.post(f"/rollouts/{aborted['id']}/abort").json()
    assert gone["status"] == "aborted"
    assert api.post(f"/rollouts/{aborted['id']}/resume").status_code == 409
    versions = {api.get(f"/engines/{u}").json()["engine_version"] for u in keys}
    assert versions <= {"ref-2", "ref-3"}  # abort leaves upgraded engines as they are

    for body in ({}, {"to_version": ""}, {"to_version": "v", "batch_size": 0},
                 {"to_version": "v", "max_failures": -1}, {"to_version": "v", "extra": 1}):
        answer = api.post("/rollouts", json=body)
        assert answer.status_code == 400, (body, answer.text)
    assert api.get("/rollouts/999999").status_code == 404
    assert api.get("/rollouts/abc").status_code == 400



def upgraded_counts(api: httpx.Client, users: list[str]) -> dict[str, int]:
    return {u: sum(1 for e in api.get(f"/engines/{u}/events").json()["events"]
                   if e["event"] == "upgraded") for u in users}


def test_sigkill_mid_rollout_then_restart_finishes_it_once_per_engine(tmp_path: Path) -> None:
    orch = Orchestrator(tmp_path, env={"ORCH_BOOT_TIMEOUT_S": "6", "ORCH_LEASE_S": "2"})
    try:
        orch.start().product("acme")
        api = orch.client("acme", timeout=60)
        keys = fleet(api, 6)
        slow = "ref-2+boot-delay-1000"
        rollout = api.post("/rollouts", json={"to_version": slow, "batch_size": 2}).json()
        wait_for(lambda: api.get(f"/rollouts/{rollout['id']}").json()["upgraded"] >= 2,
                 timeout=60, interval=0.05, what="the first batch")
        orch.kill()  # SIGKILL, most likely inside the second batch
        orch.start()
        api = orch.client("acme", timeout=60)
        done = finished(api, rollout["id"])
        assert (done["status"], done["upgraded"], done["failed"]) == ("succeeded", 6, 0), done
        assert upgraded_counts(api, list(keys)) == dict.fromkeys(keys, 1)  # none twice, none lost
        assert_brains(api, keys, slow)
    finally:
        orch.close()


def test_on_two_replicas_a_rollout_runs_on_exactly_one(tmp_path: Path) -> None:
    orch = Orchestrator(tmp_path)
    try:
        orch.start().product("acme")
        other = orch.replica()
        api = orch.client("acme", timeout=60)
        keys = fleet(api, 4)
        rollout = api.post("/rollouts", json={"to_version": "ref-2", "batch_size": 2}).json()
        done = finished(other.client("acme", timeout=60), rollout["id"])
        assert (done["status"], done["upgraded"]) == ("succeeded", 4), done
        assert upgraded_counts(api, list(keys)) == dict.fromkeys(keys, 1)
        ran = [log for log in (orch.log, other.log) if '"operation": "upgrade"' in log.read_text()
               or '"operation":"upgrade"' in log.read_text()]
        assert len(ran) == 1, "the upgrades ran on one replica only"
        assert_brains(api, keys, "ref-2")
        other.close()
    finally:
        orch.close()


def test_a_rollouts_events_page_and_stream(tmp_path: Path) -> None:
    orch = Orchestrator(tmp_path)
    try:
        orch.start().product("acme")
        api = orch.client("acme", timeout=60)
        keys = fleet(api, 2)
        with Client(orch.url, orch.keys["acme"]) as client:
            rollout = client.start_rollout("ref-2", batch_size=1)
            assert (rollout.status, rollout.total) == ("running", 2)
            seen: list[tuple[str, str]] = []
            for event in client.watch_rollout(rollout.id):
                seen.append((event.event, event.engine))
                if sum(1 for e, _ in seen if e == "upgraded") == 2:
                    break
            assert [e for e, _ in seen] == ["upgrade", "upgraded", "upgrade", "upgraded"]
            page = client.rollout_events(rollout.id, limit=3)
            assert [e.event for e in page.events] == ["upgraded", "upgrade", "upgraded"]
            rest = client.rollout_events(rollout.id, cursor=page.next_cursor)
            assert [e.event for e in rest.events] == ["upgrade"] and rest.next_cursor is None
            wait_for(lambda: client.rollout(rollout.id).status == "succeeded", what="the end")
            with pytest.raises(NotFound):
                client.rollout_events(999999)
        assert_brains(api, keys, "ref-2")
    finally:
        orch.close()
