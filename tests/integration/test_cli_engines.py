"""`orch engines get|start|stop|destroy|rotate-key` and `orch down`, against a real server,
real engines and a real database; brains read back through the engines' own API."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx

from tests.harness import Orchestrator, running, wait_for


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_engine_commands_run_the_apis_operations_with_its_errors(orch: Orchestrator) -> None:
    api = orch.client("acme")
    api.post("/engines/provision", json={"user_id": "u1"}).raise_for_status()
    assert json.loads(orch.cli("engines", "get", "acme", "u1").stdout)["status"] == "running"

    stopped = json.loads(orch.cli("engines", "stop", "acme", "u1").stdout)
    assert (stopped["status"], stopped["url"]) == ("stopped", None)
    refused = orch.cli("engines", "stop", "acme", "u1", check=False)
    answer = api.post("/engines/u1/stop").json()["error"]  # the API, asked the same
    assert refused.returncode == 1
    assert _one_line(refused) == f"orch: {answer['code']}: {answer['message']}"

    started = json.loads(orch.cli("engines", "start", "acme", "u1").stdout)
    assert started["status"] == "running"
    rotated = json.loads(orch.cli("engines", "rotate-key", "acme", "u1").stdout)
    assert rotated["status"] == "running" and rotated["api_key"]
    checked = httpx.get(rotated["url"] + "/v1/keycheck", trust_env=False,
                        headers={"Authorization": f"Bearer {rotated['api_key']}"})
    assert checked.status_code != 401  # the engine took the key the command printed

    destroyed = json.loads(orch.cli("engines", "destroy", "acme", "u1").stdout)
    assert destroyed == {"user_id": "u1", "destroyed": True}
    assert api.get("/engines/u1").status_code == 404
    events = [e["event"] for e in api.get("/engines/u1/events").json()["events"]]
    assert {"stop", "stopped", "start", "ready", "rotate_key", "destroy"} <= set(events)

    for args, status, needle in [
        (("get", "acme", "u1"), 4, "orch: ENGINE_NOT_FOUND: no engine for user 'u1'"),
        (("start", "nope", "u1"), 1, "orch: no product 'nope'"),
        (("stop", "acme", "bad\nid"), 2, "orch: user id: "),
    ]:
        result = orch.cli("engines", *args, check=False)
        assert result.returncode == status, (args, result.stderr)
        assert _one_line(result).startswith(needle), result.stderr


def _put(engine: dict[str, str], value: bytes) -> None:
    httpx.put(engine["url"] + "/v1/memory/note", content=value, trust_env=False,
              headers={"Authorization": f"Bearer {engine['api_key']}"}).raise_for_status()


def _get(engine: dict[str, str]) -> bytes:
    got = httpx.get(engine["url"] + "/v1/memory/note", trust_env=False,
                    headers={"Authorization": f"Bearer {engine['api_key']}"})
    got.raise_for_status()
    return got.content


def _gone(pid: int) -> bool:
    from app.drivers import _process

    return _process.status(pid, None) == "dead"


def test_down_then_serve_again_and_auto_wake_brings_each_engine_back(tmp_path: Path) -> None:
    with running(tmp_path, "local") as orch:
        api = orch.client("acme", timeout=60)
        woke = api.post("/engines/provision", json={"user_id": "a"}).json()
        _put(woke, b"brain of a")
        api.post("/engines/provision", json={"user_id": "b"}).raise_for_status()
        api.post("/engines/b/stop").raise_for_status()
        pids = orch.engine_pids()

        # Ctrl-C stops the server only, and says what keeps running and how to stop it.
        orch.kill(signal.SIGINT)
        note = orch.log.read_text()
        assert "the server has stopped; 1 engine (running: 1) keep running" in note, note[-2000:]
        assert "orch down" in note
        assert not any(_gone(pid) for pid in pids)
        server = orch.start().proc
        assert server is not None

        down = orch.cli("down")
        assert server.wait(timeout=60) == 0  # the server of this state dir, stopped first
        shown = {r["user_id"]: (r["was"], r["status"]) for r in json.loads(down.stdout)}
        assert shown == {"a": ("running", "sleeping"), "b": ("stopped", "stopped")}
        assert wait_for(lambda: all(_gone(pid) for pid in pids), timeout=10, what="engines ended")
        assert orch.engine_row("a")["url"] is None  # type: ignore[index]

        api = orch.start().client("acme", timeout=60)  # a new server, on a new port
        asleep = api.post("/engines/a/admit", json={}).json()
        assert (asleep["admitted"], asleep["reason"]) == (False, "engine_sleeping")
        back = api.post("/engines/a/admit", json={"auto_wake": True}).json()
        assert back["admitted"] and back["woken"] and back["status"] == "running", back
        assert _get(back) == b"brain of a"
        stays = api.post("/engines/b/admit", json={"auto_wake": True}).json()
        assert (stays["admitted"], stays["reason"]) == (False, "engine_stopped")

        again = json.loads(orch.cli("down").stdout)  # nothing left running: nothing to say twice
        assert {r["user_id"]: r["status"] for r in again} == {"a": "sleeping", "b": "stopped"}
