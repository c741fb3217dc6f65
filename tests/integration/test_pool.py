"""The warm pool: a new user's provision or admit claims a booted engine, the pool refills."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.harness import Orchestrator, running, wait_for


def warm(orch: Orchestrator, product: str = "acme") -> int:
    out = json.loads(orch.cli("products", "list", "--json").stdout)
    (entry,) = [p for p in out if p["name"] == product]
    return int(entry["warm"])


def pool_product(orch: Orchestrator, size: int, max_engines: int = 100, name: str = "acme") -> None:
    out = orch.cli("products", "create", name, "--max-engines", str(max_engines),
                   "--rate-limit-rpm", "100000", "--warm-pool", str(size))
    created = json.loads(out.stdout)
    assert created["warm_pool"] == size
    orch.keys[name] = created["platform_key"]


def engine_info(url: str, key: str) -> dict[str, object]:
    answer = httpx.get(url + "/v1/info", headers={"Authorization": f"Bearer {key}"},
                       timeout=5, trust_env=False)
    assert answer.status_code == 200
    result: dict[str, object] = answer.json()
    return result


@pytest.mark.parametrize("driver", ["local"])
def test_a_new_user_claims_a_pooled_engine_and_the_pool_refills(tmp_path: Path, driver: str) -> None:
    with running(tmp_path, driver, product=None) as orch:
        pool_product(orch, 2)
        wait_for(lambda: warm(orch) == 2, timeout=30, what="the pool to fill")
        with orch.client("acme") as client:
            assert client.get("/engines").json()["engines"] == []  # pooled engines are not users'
            answer = client.post("/engines/alice/admit", json={"auto_provision": True}).json()
            assert answer["admitted"] and answer["provisioned"] and answer["from_pool"]
            # The engine knew its user before the answer left.
            assert engine_info(answer["url"], answer["api_key"])["user_id"] == "alice"
            assert [e["user_id"] for e in client.get("/engines").json()["engines"]] == ["alice"]
            events = [e["event"] for e in client.get("/engines/alice/events").json()["events"]]
            assert events[-1] == "claimed" and events[0] == "ready"
            again = client.post("/engines/alice/admit", json={}).json()
            assert again["api_key"] == answer["api_key"] and "from_pool" not in again
            provisioned = client.post("/engines/provision", json={"user_id": "bob"}).json()
            assert provisioned["from_pool"] is True and provisioned["status"] == "running"
            assert provisioned["api_key"] != answer["api_key"]
            wait_for(lambda: warm(orch) == 2, timeout=30, what="the pool to refill")
            cold = client.post("/engines/provision", json={"user_id": "carol",
                                                           "engine_version": "ref-2"}).json()
            assert cold["from_pool"] is False  # only the default version is pooled
