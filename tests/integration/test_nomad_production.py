"""The Nomad driver on a production client's timing (the double with no --dev): a new volume
is `pending` for 5-10 s until its node's next update, evaluations are processed after the
register answers, and Consul's first check comes after a stagger. The other Nomad tests run
on a dev agent's timing for speed; here the lifecycle story, a storm and a fault run once as a
production cluster would make them wait."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.engines import assert_consistent
from tests.harness import Orchestrator, running, wait_for
from tests.integration import test_story
from tests.integration.test_faults import kill_during, status

pytestmark = pytest.mark.timeout(180)
# a provision waits for one node update (at most 10 s) before the engine boots
PRODUCTION_PROVISION_S = 30


@pytest.fixture
def production_orch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Orchestrator]:
    monkeypatch.setenv("ORCH_TEST_DOUBLE_TIMING", "production")
    # An admit that provisions answers within ORCH_BOOT_TIMEOUT_S, the node update included:
    # the harness's 10 s is a dev agent's budget, not a production cluster's (nomad/README.md).
    env = {"ORCH_LEASE_S": "1", "ORCH_BOOT_TIMEOUT_S": str(PRODUCTION_PROVISION_S)}
    with running(tmp_path, "nomad", env=env) as orchestrator:
        if orchestrator.stack is None:
            pytest.skip("a real cluster has its own timing (NOMAD_REAL=1)")
        assert orchestrator.stack.dev is False
        yield orchestrator


def test_the_lifecycle_story_on_production_timing(production_orch: Orchestrator) -> None:
    test_story.test_lifecycle_story(production_orch)


def test_a_storm_of_admits_for_new_users_on_production_timing(
        production_orch: Orchestrator) -> None:
    """30 admits each for three new users at once: one engine each, every admit answered with
    it, though every provision waits out a node update."""
    orch = production_orch

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=orch.url, timeout=60, trust_env=False,
                                     headers={"X-Platform-Key": orch.keys["acme"]},
                                     limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(
                client.post(f"/engines/{user}/admit", json={"auto_provision": True})
                for user in ("s1", "s2", "s3") for _ in range(30)))
    answers = asyncio.run(storm())
    assert [a.status_code for a in answers] == [200] * 90
    by_user: dict[str, set[str]] = {}
    for answer in answers:
        body = answer.json()
        assert body["admitted"], body
        by_user.setdefault(body["user_id"], set()).add(body["url"])
    assert {u: len(urls) for u, urls in by_user.items()} == {"s1": 1, "s2": 1, "s3": 1}
    assert orch.rows("SELECT COUNT(*) FROM event WHERE event = 'provision'")[0][0] == 3
    assert_consistent(orch)


def test_killed_while_its_volume_is_pending(production_orch: Orchestrator) -> None:
    """SIGKILL the orchestrator while the new volume waits for its node update: the provision
    is resumed, with the one volume, and registry and Nomad agree."""
    orch = production_orch
    kill_during(orch, lambda c: c.post("/engines/provision", json={"user_id": "p"}),
                begun=lambda: "volume" in json.loads(
                    (orch.engine_row("p") or {}).get("driver_state") or "{}"), after=0.5)
    wait_for(lambda: status(orch, "p") == "running", timeout=PRODUCTION_PROVISION_S,
             what="provision resumed")
    assert_consistent(orch)
    assert orch.client("acme").post("/engines/p/admit").json()["admitted"]
    volumes = [v for v in orch.stack.state()["volumes"] if v["name"].startswith("e-acme-p-")]
    assert len(volumes) == 1
