"""End to end: a product made after another was deleted never sees its audit trail
(product ids are never reused, on SQLite as on PostgreSQL)."""

from __future__ import annotations

from tests.harness import Orchestrator


def test_a_new_product_never_sees_a_deleted_ones_events(orch: Orchestrator) -> None:
    orch.product("tmp-x")
    old = orch.client("tmp-x")
    assert old.post("/engines/provision", json={"user_id": "secret-user"}).status_code == 200
    assert old.delete("/engines/secret-user").status_code == 200
    assert old.get("/engines/secret-user/events").json()["events"]  # tmp-x's trail is kept
    orch.cli("products", "delete", "tmp-x")
    orch.product("tmp-y")
    new = orch.client("tmp-y")
    assert new.get("/engines/secret-user/events").json()["events"] == []
    ids = dict(orch.rows("SELECT name, id FROM product"))
    assert "tmp-x" not in ids
    assert (ids["tmp-y"],) not in orch.rows("SELECT DISTINCT product_id FROM event WHERE product_id > 0")
