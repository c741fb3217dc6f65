"""The whole lifecycle of one engine, through the real API, with a real engine process, on
both drivers (the Nomad one against the double, or real agents with NOMAD_REAL=1)."""

from __future__ import annotations

import httpx

from tests.engines import brain_dir, engine_log, nothing_left, proc_state
from tests.harness import Orchestrator, wait_for


def engine_get(url: str, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + path, headers=headers, timeout=5, trust_env=False)


def test_lifecycle_story(any_orch: Orchestrator) -> None:
    orch = any_orch
    api = orch.client("acme")

    # provision
    r = api.post("/engines/provision", json={"user_id": "alice"})
    assert r.status_code == 200, r.text
    engine = r.json()
    assert engine["status"] == "running" and engine["url"] and engine["api_key"]
    url, key = engine["url"], engine["api_key"]
    assert engine["url"].startswith("http://127.0.0.1:")

    # GET never shows the key
    got = api.get("/engines/alice").json()
    assert got["status"] == "running" and got["url"] == url and "api_key" not in got

    # admit
    admitted = api.post("/engines/alice/admit", json={}).json()
    assert admitted == {"admitted": True, "user_id": "alice", "url": url, "api_key": key,
                        "status": "running", "engine_version": engine["engine_version"],
                        "provisioned": False, "woken": False}

    # the engine answers with the key, and refuses without it
    put = httpx.put(url + "/v1/memory/color", content=b"blue",
                    headers={"Authorization": f"Bearer {key}"}, trust_env=False)
    assert put.status_code in (200, 201, 204)
    assert engine_get(url, "/v1/memory/color", key).content == b"blue"
    assert engine_get(url, "/v1/memory/color", None).status_code == 401
    pid = engine_get(url, "/v1/info", key).json()["pid"]

    # rotate-key: the old key is refused by the engine, the new one accepted
    rotated = api.post("/engines/alice/rotate-key")
    assert rotated.status_code == 200, rotated.text
    new_key = rotated.json()["api_key"]
    assert new_key != key
    assert engine_get(url, "/v1/keycheck", key).status_code == 401
    assert engine_get(url, "/v1/keycheck", new_key).status_code == 200
    assert api.post("/engines/alice/admit").json()["api_key"] == new_key

    # stop: SIGTERM first, then the process is gone
    stopped = api.post("/engines/alice/stop")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped"
    assert proc_state(pid) == "gone"
    log = engine_log(orch, "alice")
    assert "received SIGTERM" in log and "shutdown complete" in log

    # admit does not start a stopped engine
    denied = api.post("/engines/alice/admit", json={"auto_provision": True, "auto_wake": True})
    assert denied.json() == {"admitted": False, "reason": "engine_stopped", "status": "stopped"}

    # start: the brain survived
    started = api.post("/engines/alice/start")
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "running"
    url = started.json()["url"]
    assert engine_get(url, "/v1/memory/color", new_key).content == b"blue"

    # restart the orchestrator with a short idle timeout: the engine is adopted, then sleeps
    # (the pid is read first: the new orchestrator may put the engine to sleep at once)
    pid = engine_get(url, "/v1/info", new_key).json()["pid"]
    orch.env["ORCH_IDLE_SLEEP_S"] = "1"
    orch.restart()
    api = orch.client("acme")
    wait_for(lambda: api.get("/engines/alice").json()["status"] == "sleeping", timeout=15,
             what="idle sleep")
    wait_for(lambda: proc_state(pid) == "paused", what="SIGSTOP")

    denied = api.post("/engines/alice/admit", json={"auto_wake": False}).json()
    assert denied == {"admitted": False, "reason": "engine_sleeping", "status": "sleeping"}
    woken = api.post("/engines/alice/admit", json={"auto_wake": True}).json()
    assert woken["admitted"] and woken["woken"] and woken["url"] == url
    assert engine_get(url, "/v1/info", new_key).json()["pid"] == pid  # the same process
    assert engine_get(url, "/v1/memory/color", new_key).content == b"blue"

    # destroy: process, brain, port and row gone; the events stay
    brain = brain_dir(orch, "alice")
    assert brain.exists()
    destroyed = api.delete("/engines/alice")
    assert destroyed.json() == {"user_id": "alice", "destroyed": True}
    assert proc_state(pid) == "gone"
    assert not brain.exists()
    assert orch.rows("SELECT * FROM engine") == []
    assert nothing_left(orch) == {}
    assert api.get("/engines/alice").status_code == 404
    events = api.get("/engines/alice/events").json()["events"]
    kinds = [e["event"] for e in reversed(events)]
    assert kinds[0] == "provision" and kinds[-1] == "destroyed"
    assert {"rotate_key", "stop", "stopped", "sleep", "start", "ready", "destroy"} <= set(kinds)
