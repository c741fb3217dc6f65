"""Concurrency, tenancy and restarts, against the real server and real engines."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from tests.engines import proc_state
from tests.harness import Orchestrator


async def burst(orch: Orchestrator, product: str,
                requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(requests) + 10)
    async with httpx.AsyncClient(base_url=orch.url, headers={"X-Platform-Key": orch.keys[product]},
                                 timeout=60, limits=limits, trust_env=False) as client:
        return await asyncio.gather(*(client.request(m, p, json=b) for m, p, b in requests))


def test_200_admits_for_a_new_user_make_one_engine(orch: Orchestrator) -> None:
    answers = asyncio.run(burst(orch, "acme", [("POST", "/engines/carol/admit",
                                                {"auto_provision": True})] * 200))
    assert [a.status_code for a in answers] == [200] * 200
    bodies = [a.json() for a in answers]
    assert all(b["admitted"] for b in bodies)
    assert len({b["url"] for b in bodies}) == 1 and len({b["api_key"] for b in bodies}) == 1
    assert orch.rows("SELECT COUNT(*) FROM engine")[0][0] == 1
    assert orch.rows("SELECT COUNT(*) FROM port_lease")[0][0] == 1
    provisions = orch.rows("SELECT COUNT(*) FROM event WHERE event = 'provision'")[0][0]
    assert provisions == 1


def test_100_provisions_against_a_quota_of_10(orch: Orchestrator) -> None:
    orch.product("ten", max_engines=10)
    answers = asyncio.run(burst(orch, "ten", [("POST", "/engines/provision", {"user_id": f"u{i}"})
                                             for i in range(100)]))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) == 10 and codes.count(429) == 90, codes
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 429} == {"QUOTA_EXCEEDED"}
    assert orch.rows("SELECT COUNT(*) FROM engine")[0][0] == 10
    assert orch.rows("SELECT COUNT(*) FROM port_lease")[0][0] == 10
    brains = list((orch.state_dir / "brains").iterdir())
    assert len(brains) == 10
    assert all(proc_state(pid) == "running" for pid in orch.engine_pids())
    assert len(orch.engine_pids()) == 10


def test_products_cannot_reach_each_others_engines(orch: Orchestrator) -> None:
    orch.product("other")
    mine, theirs = orch.client("acme"), orch.client("other")
    assert mine.post("/engines/provision", json={"user_id": "dave"}).status_code == 200
    before = orch.rows("SELECT id, status, row_version FROM engine")
    for method, path in [("GET", "/engines/dave"), ("DELETE", "/engines/dave"),
                         ("POST", "/engines/dave/start"), ("POST", "/engines/dave/stop"),
                         ("POST", "/engines/dave/rotate-key")]:
        response = theirs.request(method, path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "ENGINE_NOT_FOUND"
    assert theirs.get("/engines").json() == {"engines": [], "next_cursor": None}
    assert theirs.get("/engines/dave/events").json() == {"events": [], "next_cursor": None}
    denied = theirs.post("/engines/dave/admit").json()
    assert denied == {"admitted": False, "reason": "engine_not_found", "status": None}
    assert orch.rows("SELECT id, status, row_version FROM engine") == before
    # the same user id in another product is another engine
    other = theirs.post("/engines/dave/admit", json={"auto_provision": True}).json()
    assert other["admitted"] and other["url"] != mine.get("/engines/dave").json()["url"]


def test_list_pages_through_engines(orch: Orchestrator) -> None:
    api = orch.client("acme")
    for user in ("p1", "p2", "p3"):
        assert api.post("/engines/provision", json={"user_id": user}).status_code == 200
    api.post("/engines/p2/stop")
    first = api.get("/engines", params={"limit": 2}).json()
    assert [e["user_id"] for e in first["engines"]] == ["p1", "p2"] and first["next_cursor"]
    second = api.get("/engines", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [e["user_id"] for e in second["engines"]] == ["p3"] and second["next_cursor"] is None
    stopped = api.get("/engines", params={"status": "stopped"}).json()["engines"]
    assert [e["user_id"] for e in stopped] == ["p2"]


def test_orchestrator_restart_adopts_running_engines(orch: Orchestrator) -> None:
    api = orch.client("acme")
    urls = {}
    for user in ("e1", "e2"):
        urls[user] = api.post("/engines/provision", json={"user_id": user}).json()["url"]
    pids = orch.engine_pids()
    orch.restart()  # SIGKILL, then a new process on the same database
    api = orch.client("acme")
    for user in ("e1", "e2"):
        answer = api.post(f"/engines/{user}/admit").json()
        assert answer["admitted"] and answer["url"] == urls[user] and not answer["provisioned"]
    assert orch.engine_pids() == pids and all(proc_state(p) == "running" for p in pids)
    # an adopted engine can still be stopped and destroyed by the new process
    assert api.post("/engines/e1/stop").json()["status"] == "stopped"
    assert api.delete("/engines/e2").status_code == 200
    assert all(proc_state(p) == "gone" for p in pids)


def test_crashed_engine_is_restarted_then_given_up(tmp_path: Path) -> None:
    from tests.harness import wait_for

    orch = Orchestrator(tmp_path, env={"ORCH_MAX_RESTARTS": "1"}).start()
    try:
        orch.product("acme")
        api = orch.client("acme")
        engine = api.post("/engines/provision", json={"user_id": "fragile"}).json()
        pid = json.loads(orch.engine_row("fragile")["driver_state"])["pid"]
        import os
        import signal
        os.kill(pid, signal.SIGKILL)
        # restarted automatically: a new process, running again
        def restarted() -> bool:
            # One read of the row: a running row and a new pid from two reads could be the
            # old running row and the failed one in between (which has no pid at all).
            row = orch.engine_row("fragile")
            new_pid = json.loads(row["driver_state"]).get("pid")
            return row["status"] == "running" and new_pid is not None and new_pid != pid

        wait_for(restarted, timeout=15, what="auto-restart")
        assert api.get("/engines/fragile").json()["restarts"] == 1
        pid = json.loads(orch.engine_row("fragile")["driver_state"])["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: orch.engine_row("fragile")["status"] == "failed", timeout=15,
                 what="failed after the last restart")
        got = api.get("/engines/fragile").json()
        assert got["failure_reason"] == "crashed" and got["url"] is None
        assert api.post("/engines/fragile/admit").json()["reason"] == "engine_unhealthy"
        # an explicit start brings it back and resets the count
        started = api.post("/engines/fragile/start").json()
        assert started["status"] == "running" and started["restarts"] == 0
        assert engine["url"]
    finally:
        orch.close()
