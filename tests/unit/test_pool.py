"""What the warm pool's refiller decides to remove and boot (app.pool.needs), and the claim's
compare-and-sets on a real registry (app.registry.pool)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from app import errors, products, registry, states
from app.pool import needs
from app.registry import EngineRow


def row(i: int, status: str = states.RUNNING, version: str = "v1") -> Any:
    return SimpleNamespace(id=i, status=status, engine_version=version)


def product(size: int) -> Any:
    return SimpleNamespace(warm_pool=size)


def test_a_short_pool_boots_what_is_missing_counting_the_booting_ones() -> None:
    wanted = needs(product(3), [row(1), row(2, states.PROVISIONING)], "v1")
    assert wanted.remove == [] and wanted.missing == 1


def test_failed_and_outdated_engines_are_replaced() -> None:
    failed, old, ok = row(1, states.FAILED), row(2, version="v0"), row(3)
    wanted = needs(product(3), [failed, old, ok], "v1")
    assert wanted.remove == [failed, old] and wanted.missing == 2


def test_a_smaller_target_removes_the_newest_and_a_full_pool_needs_nothing() -> None:
    rows = [row(1), row(2), row(3)]
    assert needs(product(1), rows, "v1").remove == rows[1:]
    assert not needs(product(3), rows, "v1").any
    assert not needs(product(0), [row(4, states.DESTROYING)], "v1").any  # already going




def pooled(product_id: int, version: str = "v1", status: str = states.RUNNING) -> EngineRow:
    user = registry.pool.new_pool_user()
    row = registry.insert_engine(product_id, user, "e" + user.replace("/", "-"), version, "enc",
                                 "filler", 10, in_pool=True)
    row = registry.transition(row, "ready", url="http://127.0.0.1:1")
    if status == states.SLEEPING:
        row = registry.transition(row, "sleep")
    registry.release_lease(row, "filler")
    return row


def test_a_claim_takes_a_running_engine_of_its_version_once_and_ready_is_compare_and_set(db: Any) -> None:
    product, _ = products.create("p", max_engines=10, warm_pool=3)
    sleeping, _old, running = (pooled(product.id, status=states.SLEEPING),
                               pooled(product.id, "v0"), pooled(product.id))
    taken = registry.pool.claim(product.id, "alice", "v1", "me", 10)
    assert taken is not None
    row, was = taken
    assert (row.id, was, row.status, row.user_id, row.in_pool) == \
        (running.id, states.RUNNING, states.STARTING, "alice", False)
    assert registry.reload(row) == row  # what the claim returns is what it wrote
    with pytest.raises(errors.EngineAlreadyExists):
        registry.pool.claim(product.id, "alice", "v1", "me", 10)
    second = registry.pool.claim(product.id, "bob", "v1", "me", 10)
    assert second is not None and second[0].id == sleeping.id and second[1] == states.SLEEPING
    assert registry.pool.claim(product.id, "carol", "v1", "me", 10) is None  # only v0 is left
    ready = registry.pool.ready(row)
    assert ready.status == states.RUNNING and registry.reload(row) == ready
    with pytest.raises(errors.Conflict):
        registry.pool.ready(row)  # read before the change: loses
    events = [e.event for e in registry.events_for(product.id, "alice")]
    assert events[:2] == ["ready", "claimed"]
