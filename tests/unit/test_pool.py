"""What the warm pool's refiller decides to remove and boot (app.pool.needs)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from app import states
from app.pool import needs


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
