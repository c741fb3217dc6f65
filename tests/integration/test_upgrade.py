"""Upgrades: POST /engines/{user_id}/upgrade on both drivers, with real engines.
Every test ends by reading the brain back with the engine's key."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.client import Client, EngineBusy, UpgradeFailed
from tests.engines import engine_processes
from tests.harness import Orchestrator, wait_for


@pytest.fixture(params=["local", "nomad"])
def make_orch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Orchestrator]]:
    made: list[Orchestrator] = []

    def make(**env: str) -> Orchestrator:
        # A short boot timeout: a version that never gets healthy is given up on sooner.
        orchestrator = Orchestrator(tmp_path / str(len(made)),
                                    env={"ORCH_BOOT_TIMEOUT_S": "4", **env}, driver=request.param)
        made.append(orchestrator)
        orchestrator.start().product("acme")
        return orchestrator

    yield make
    for orchestrator in made:
        if orchestrator.stack is not None:
            assert orchestrator.stack.rejections() == [], "the double refused a driver request"
        orchestrator.close()


@pytest.fixture
def orch(make_orch: Callable[..., Orchestrator]) -> Orchestrator:
    return make_orch()


def engine_call(method: str, url: str, key: str, path: str, content: bytes | None = None) -> httpx.Response:
    return httpx.request(method, url + path, content=content, trust_env=False, timeout=5,
                         headers={"Authorization": f"Bearer {key}"})


def provision_with_brain(api: httpx.Client, user_id: str, version: str) -> str:
    """A running engine on `version` holding one memory; returns its key."""
    engine = api.post("/engines/provision", json={"user_id": user_id, "engine_version": version})
    assert engine.status_code == 200, engine.text
    key: str = engine.json()["api_key"]
    assert engine_call("PUT", engine.json()["url"], key, "/v1/memory/colour", b"blue").is_success
    return key


def assert_running_on(api: httpx.Client, user_id: str, key: str, version: str) -> None:
    """Running on `version` (the engine itself says so), its brain intact."""
    engine = api.get(f"/engines/{user_id}").json()
    assert (engine["status"], engine["engine_version"]) == ("running", version), engine
    assert engine_call("GET", engine["url"], key, "/v1/info").json()["version"] == version
    assert engine_call("GET", engine["url"], key, "/v1/memory/colour").content == b"blue"


def events_of(api: httpx.Client, user_id: str) -> list[tuple[str, str | None]]:
    """(event, reason), oldest first."""
    events = api.get(f"/engines/{user_id}/events").json()["events"]
    return [(e["event"], e["reason"]) for e in reversed(events)]


def test_a_running_engine_restarts_on_the_new_version_with_its_brain(orch: Orchestrator) -> None:
    api = orch.client("acme")
    key = provision_with_brain(api, "alice", "ref-1")
    with Client(orch.url, orch.keys["acme"]) as client:
        upgraded = client.upgrade("alice", "ref-2")
    assert (upgraded.status, upgraded.engine_version) == ("running", "ref-2")
    assert_running_on(api, "alice", key, "ref-2")
    assert events_of(api, "alice")[-2:] == [("upgrade", "ref-1 -> ref-2"),
                                            ("upgraded", "ref-1 -> ref-2")]
    # The same version again changes nothing.
    again = api.post("/engines/alice/upgrade", json={"engine_version": "ref-2"})
    assert again.status_code == 200 and again.json()["engine_version"] == "ref-2"
    assert events_of(api, "alice")[-1][0] == "upgraded"


def test_a_version_that_never_gets_healthy_is_rolled_back(orch: Orchestrator) -> None:
    api = orch.client("acme")
    key = provision_with_brain(api, "bob", "ref-1")
    bad = "ref-2+fault-never-healthy"
    answer = api.post("/engines/bob/upgrade", json={"engine_version": bad})
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "UPGRADE_FAILED"
    assert_running_on(api, "bob", key, "ref-1")
    events = events_of(api, "bob")
    assert ("upgrade", f"ref-1 -> {bad}") in events
    assert events[-1] == ("upgrade_rolled_back", f"boot_timeout; {bad} -> ref-1")
    assert orch.engine_row("bob")["previous_version"] is None  # type: ignore[index]


def test_a_crashing_version_is_rolled_back_through_the_client(orch: Orchestrator) -> None:
    api = orch.client("acme")
    key = provision_with_brain(api, "carol", "ref-1")
    with Client(orch.url, orch.keys["acme"]) as client:
        with pytest.raises(UpgradeFailed) as failed:
            client.upgrade("carol", "ref-2+fault-crash")
    assert failed.value.status == 502
    assert_running_on(api, "carol", key, "ref-1")
    assert events_of(api, "carol")[-1][0] == "upgrade_rolled_back"


def test_a_stopped_engine_takes_the_new_version_at_its_next_start(orch: Orchestrator) -> None:
    api = orch.client("acme")
    key = provision_with_brain(api, "dave", "ref-1")
    assert api.post("/engines/dave/stop").json()["status"] == "stopped"
    recorded = api.post("/engines/dave/upgrade", json={"engine_version": "ref-2"}).json()
    assert (recorded["status"], recorded["engine_version"]) == ("stopped", "ref-2")
    assert events_of(api, "dave")[-1] == ("upgraded", "ref-1 -> ref-2; applies at next start")
    assert api.post("/engines/dave/start").status_code == 200
    assert_running_on(api, "dave", key, "ref-2")


def test_a_paused_sleeper_wakes_cold_on_the_new_version(make_orch: Callable[..., Orchestrator]) -> None:
    orch = make_orch(ORCH_IDLE_SLEEP_S="3", ORCH_SLEEP_MODE="pause")
    api = orch.client("acme")
    key = provision_with_brain(api, "fay", "ref-1")
    wait_for(lambda: api.get("/engines/fay").json()["status"] == "sleeping", timeout=20,
             what="idle sleep")
    recorded = api.post("/engines/fay/upgrade", json={"engine_version": "ref-2"}).json()
    assert (recorded["status"], recorded["engine_version"], recorded["url"]) == ("sleeping", "ref-2", None)
    woken = api.post("/engines/fay/admit", json={"auto_wake": True}).json()
    assert woken["admitted"] and woken["woken"] and woken["engine_version"] == "ref-2"
    assert engine_call("GET", woken["url"], key, "/v1/info").json()["version"] == "ref-2"
    assert engine_call("GET", woken["url"], key, "/v1/memory/colour").content == b"blue"


def test_bad_requests_change_nothing(orch: Orchestrator) -> None:
    api = orch.client("acme")
    key = provision_with_brain(api, "erin", "ref-1")
    for body in ({}, {"engine_version": ""}, {"engine_version": 3}, {"engine_version": "a\x00b"},
                 {"engine_version": "ref-2", "extra": 1}):
        answer = api.post("/engines/erin/upgrade", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["code"] == "INVALID_REQUEST"
    if orch.driver == "nomad":  # a repository outside ORCH_ENGINE_IMAGES, and `latest`
        for version in ("evil.example/x:1", "latest"):
            assert api.post("/engines/erin/upgrade", json={"engine_version": version}).status_code == 400
    missing = api.post("/engines/nobody/upgrade", json={"engine_version": "ref-2"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "ENGINE_NOT_FOUND"
    assert_running_on(api, "erin", key, "ref-1")
    assert "upgrade" not in {e for e, _ in events_of(api, "erin")}


def test_an_upgrade_cut_short_by_a_crash_is_rolled_back_on_restart(
        make_orch: Callable[..., Orchestrator]) -> None:
    orch = make_orch(ORCH_BOOT_TIMEOUT_S="10", ORCH_LEASE_S="2")
    api = orch.client("acme")
    key = provision_with_brain(api, "gus", "ref-1")
    slow = "ref-2+boot-delay-6000"
    upgrading = threading.Thread(target=_quietly, args=(
        lambda: api.post("/engines/gus/upgrade", json={"engine_version": slow}),))
    upgrading.start()

    def launched_new() -> bool:
        row = orch.engine_row("gus") or {}
        state = json.loads(row.get("driver_state") or "{}")
        return row.get("previous_version") == "ref-1" and bool(state.get("pid") or state.get("alloc"))

    wait_for(launched_new, timeout=20, what="the new version's launch")
    orch.kill()  # SIGKILL mid-upgrade: the row is `starting`, on the new version, leased
    upgrading.join(timeout=30)
    orch.start()
    api = orch.client("acme")
    wait_for(lambda: api.get("/engines/gus").json()["status"] == "running", timeout=40,
             what="the recovery")
    assert_running_on(api, "gus", key, "ref-1")
    assert events_of(api, "gus")[-1] == ("upgrade_rolled_back", f"interrupted; {slow} -> ref-1")
    name = orch.engine_row("gus")["name"]  # type: ignore[index]
    wait_for(lambda: len(engine_processes(orch).get(name, [])) == 1, timeout=15,
             what="one engine process, the old version's")


def _quietly(call: Callable[[], object]) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass  # the orchestrator was killed under it


def test_concurrent_upgrades_to_two_versions_each_get_their_own(orch: Orchestrator) -> None:
    api = orch.client("acme")
    key = provision_with_brain(api, "hal", "ref-1")
    answers: dict[str, httpx.Response] = {}

    def upgrade(version: str) -> None:
        answers[version] = api.post("/engines/hal/upgrade", json={"engine_version": version})

    # Slow boots: the three calls arrive while the first upgrade still runs.
    two, three = "ref-2+boot-delay-1500", "ref-3+boot-delay-1500"
    callers = [threading.Thread(target=upgrade, args=(v,)) for v in (two, two, three)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=60)
    assert {v: a.json()["engine_version"] for v, a in answers.items()} == {two: two, three: three}
    final = api.get("/engines/hal").json()["engine_version"]
    assert_running_on(api, "hal", key, final)
    upgrades = [r for e, r in events_of(api, "hal") if e == "upgrade"]
    assert len(upgrades) == 2, upgrades  # the two callers of `two` shared one run


def test_an_upgrade_held_off_past_the_wait_is_409_engine_busy(tmp_path: Path) -> None:
    # Another replica holds the engine's lease (its operation hung on the scheduler, say) for
    # longer than the wait: boot timeout + stop grace + two lease periods, 4 s here.
    orch = Orchestrator(tmp_path, env={"ORCH_BOOT_TIMEOUT_S": "2", "ORCH_STOP_GRACE_S": "1",
                                       "ORCH_LEASE_S": "1"}).start()
    try:
        orch.product("acme")
        api = orch.client("acme")
        key = provision_with_brain(api, "ida", "ref-1")
        orch.execute("UPDATE engine SET lease_owner = 'other-replica', lease_until = ? "
                     "WHERE user_id = 'ida'", time.time() + 120)
        answer = api.post("/engines/ida/upgrade", json={"engine_version": "ref-2"})
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "ENGINE_BUSY"
        with Client(orch.url, orch.keys["acme"], timeout=30) as client, pytest.raises(EngineBusy):
            client.upgrade("ida", "ref-2")
        assert_running_on(api, "ida", key, "ref-1")
        assert "upgrade" not in {e for e, _ in events_of(api, "ida")}
        # The holder lets go: the same call now goes through.
        orch.execute("UPDATE engine SET lease_owner = NULL, lease_until = NULL WHERE user_id = 'ida'")
        assert api.post("/engines/ida/upgrade", json={"engine_version": "ref-2"}).status_code == 200
        assert_running_on(api, "ida", key, "ref-2")
    finally:
        orch.close()
