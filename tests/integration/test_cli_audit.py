"""`orch audit` across products: one user id in two products is two people, so each event
names its product."""

from __future__ import annotations

import json

from tests.harness import Orchestrator


def test_the_audit_names_each_events_product(orch: Orchestrator) -> None:
    orch.product("shop")
    for product in ("acme", "shop"):
        made = orch.client(product).post("/engines/provision", json={"user_id": "carol"})
        assert made.status_code == 200, made.text
    trail = json.loads(orch.cli("audit", "--json").stdout)
    carols = {(e["product"], e["engine"]) for e in trail if e["user_id"] == "carol"}
    assert {p for p, _ in carols} == {"acme", "shop"} and len(carols) == 2
    mine = json.loads(orch.cli("audit", "--product", "shop", "--user", "carol").stdout)
    assert mine and {e["product"] for e in mine} == {"shop"}
