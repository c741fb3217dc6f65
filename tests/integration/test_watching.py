"""Watching: admit with `wait: false` never blocks on a boot; events follow as
Server-Sent Events. Real orchestrator, real engines, both drivers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.client import AsyncClient, Client, InvalidRequest
from tests.harness import Orchestrator, running, wait_for

SLOW = "ref+boot-delay-3000"


@pytest.fixture(params=["local", "nomad"])
def orch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Orchestrator]:
    with running(tmp_path, request.param) as orchestrator:
        yield orchestrator


def test_admit_without_wait_answers_at_once_during_a_slow_boot(orch: Orchestrator) -> None:
    api = orch.client("acme")
    provisioned: list[httpx.Response] = []
    booting = threading.Thread(target=lambda: provisioned.append(api.post(
        "/engines/provision", json={"user_id": "slow", "engine_version": SLOW})))
    booting.start()
    try:
        wait_for(lambda: orch.engine_row("slow") is not None, what="the engine's row")
        started = time.monotonic()
        answer = api.post("/engines/slow/admit", json={"wait": False, "auto_provision": True})
        elapsed = time.monotonic() - started
    finally:
        booting.join(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"admitted": False, "reason": "engine_starting", "status": "provisioning"}
    assert elapsed < 2.0, elapsed  # generous; the boot alone takes 3 s
    assert provisioned and provisioned[0].status_code == 200, provisioned
    with Client(orch.url, orch.keys["acme"]) as client:
        admitted = client.admit("slow", wait=False)
    assert admitted.admitted and admitted.url == provisioned[0].json()["url"]


def test_admit_without_wait_provisions_in_the_background(orch: Orchestrator) -> None:
    api = orch.client("acme")
    first = api.post("/engines/fresh/admit", json={"wait": False, "auto_provision": True}).json()
    assert first == {"admitted": False, "reason": "engine_starting", "status": "provisioning"}
    admitted = wait_for(lambda: api.post("/engines/fresh/admit", json={"wait": False}).json()
                        if api.get("/engines/fresh").json()["status"] == "running" else None,
                        timeout=30, what="the engine to run")
    assert admitted["admitted"] and admitted["status"] == "running"
    events = [e["event"] for e in api.get("/engines/fresh/events").json()["events"]]
    assert events == ["ready", "provision"]  # provisioned once, by the first admit
    # Without auto_provision nothing is started; a stopped engine is not started either.
    assert api.post("/engines/nobody/admit", json={"wait": False}).json() == {
        "admitted": False, "reason": "engine_not_found", "status": None}
    api.post("/engines/fresh/stop")
    assert api.post("/engines/fresh/admit", json={"wait": False, "auto_wake": True}).json() == {
        "admitted": False, "reason": "engine_stopped", "status": "stopped"}


def test_admit_without_wait_still_answers_the_quota(tmp_path: Path) -> None:
    with running(tmp_path, "local", product=None) as orch:
        orch.product("tiny", max_engines=1)
        api = orch.client("tiny")
        assert api.post("/engines/provision", json={"user_id": "one"}).status_code == 200
        answer = api.post("/engines/two/admit", json={"wait": False, "auto_provision": True})
        assert answer.status_code == 429 and answer.json()["error"]["code"] == "QUOTA_EXCEEDED"
        assert orch.engine_row("two") is None


def test_a_follower_receives_the_stop_event_as_it_happens(tmp_path: Path) -> None:
    with running(tmp_path, "local") as orch:
        api = orch.client("acme")
        assert api.post("/engines/provision", json={"user_id": "w"}).status_code == 200
        stopper = threading.Thread(target=lambda: api.post("/engines/w/stop"))
        seen: list[dict[str, object]] = []
        timeout = httpx.Timeout(10.0, read=20.0)
        with httpx.Client(base_url=orch.url, headers={"X-Platform-Key": orch.keys["acme"]},
                          timeout=timeout, trust_env=False) as follower, \
                follower.stream("GET", "/engines/w/events", params={"follow": "true"}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                seen.append(json.loads(line[len("data: "):]))
                if seen[-1]["event"] == "ready":  # the latest events came first; now act
                    stopper.start()
                if seen[-1]["event"] == "stopped":
                    break
        stopper.join(timeout=30)
        assert [e["event"] for e in seen] == ["provision", "ready", "stop", "stopped"]
        assert all(e["engine"] == seen[0]["engine"] for e in seen)
        assert [e["id"] for e in seen] == sorted(e["id"] for e in seen)  # type: ignore[type-var]
        for bad in ({"follow": "yes"}, {"follow": "true", "cursor": "ZToz"}):
            answer = api.get("/engines/w/events", params=bad)
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_REQUEST"
        page = api.get("/engines/w/events", params={"follow": "false"}).json()
        assert [e["event"] for e in page["events"]] == ["stopped", "stop", "ready", "provision"]


def test_the_clients_watch_follows_the_events(tmp_path: Path) -> None:
    with running(tmp_path, "local") as orch:
        api = orch.client("acme")
        assert api.post("/engines/provision", json={"user_id": "cw"}).status_code == 200
        with Client(orch.url, orch.keys["acme"]) as client:
            seen = []
            for event in client.watch("cw"):
                seen.append(event.event)
                if event.event == "ready":
                    threading.Thread(target=lambda: api.post("/engines/cw/stop")).start()
                if event.event == "stopped":
                    break
            assert seen == ["provision", "ready", "stop", "stopped"]
            with pytest.raises(InvalidRequest):
                next(client.watch("cw", latest=0))

        async def watch_async() -> list[str]:
            async with AsyncClient(orch.url, orch.keys["acme"]) as client:
                seen: list[str] = []
                async for event in client.watch("cw", latest=1):
                    seen.append(event.event)
                    if event.event == "stopped" and len(seen) == 1:
                        await asyncio.to_thread(api.post, "/engines/cw/start")
                    if event.event == "ready":
                        return seen
            return seen

        assert asyncio.run(asyncio.wait_for(watch_async(), 60)) == ["stopped", "start", "ready"]
