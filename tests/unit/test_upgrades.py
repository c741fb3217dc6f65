"""Upgrades in process (real SQLite registry, the real runner, a FakeDriver): the cases the
reference engine cannot stage end to end. Each test ends by checking the audit trail walks
along the state table."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app import errors, registry, states
from app.drivers.base import EngineSpec
from app.operations import Op
from tests.inproc import Behaviour, World


def test_when_neither_version_comes_up_the_engine_is_failed_on_the_old_one(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour(), boot_timeout_s=0.3)
    try:
        world.run(world.op(Op.PROVISION, "a", engine_version="v1"))
        world.driver.behaviour.never_ready = True
        with pytest.raises(errors.UpgradeFailed):
            world.run(world.op(Op.UPGRADE, "a", version="v2"))
        row = world.row("a")
        assert row is not None and row.status == states.FAILED
        assert (row.engine_version, row.previous_version) == ("v1", None)
        assert row.failure_reason == "boot_timeout" and world.driver.running() == set()
        assert [e for e, _, _ in world.trail("a")][-2:] == ["upgrade", "boot_failed"]
        world.assert_valid_trail("a")
    finally:
        world.close()


def _is_v2(spec: EngineSpec) -> bool:
    return spec.engine_version == "v2"


@pytest.mark.parametrize("behaviour,said,reason", [
    (Behaviour(crash_if=_is_v2), "crashed while booting", "crashed"),
    (Behaviour(never_ready_if=_is_v2), "did not become healthy within 0.3s", "boot_timeout"),
    (Behaviour(unplaceable_if=_is_v2), "could not be placed", "placement_failed")])
def test_a_failed_upgrade_names_its_cause(tmp_path: Path, behaviour: Behaviour, said: str,
                                          reason: str) -> None:
    world = World(tmp_path, behaviour, boot_timeout_s=0.3)
    try:
        world.run(world.op(Op.PROVISION, "e", engine_version="v1"))
        with pytest.raises(errors.UpgradeFailed) as caught:
            world.run(world.op(Op.UPGRADE, "e", version="v2"))
        assert said in caught.value.message and "back on 'v1'" in caught.value.message
        if reason != "boot_timeout":
            assert "healthy within" not in caught.value.message
        last = registry.events_for(world.product.id, "e")[0]
        assert (last.event, last.reason) == ("upgrade_rolled_back", f"{reason}; v2 -> v1")
        row = world.row("e")
        assert row is not None and (row.status, row.engine_version) == (states.RUNNING, "v1")
        world.assert_valid_trail("e")
    finally:
        world.close()


def test_an_unreachable_scheduler_changes_nothing(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour())
    try:
        world.run(world.op(Op.PROVISION, "b", engine_version="v1"))
        before = world.row("b")
        world.driver.behaviour.scheduler_down = True
        with pytest.raises(errors.SchedulerUnavailable):
            world.run(world.op(Op.UPGRADE, "b", version="v2"))
        after = world.row("b")
        assert after is not None and before is not None
        assert (after.status, after.engine_version, after.row_version) == (
            states.RUNNING, "v1", before.row_version)
        world.assert_valid_trail("b")
    finally:
        world.close()


def test_unknown_engine_and_same_version(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour())
    try:
        with pytest.raises(errors.EngineNotFound):
            world.run(world.op(Op.UPGRADE, "nobody", version="v2"))
        row, _ = world.run(world.op(Op.PROVISION, "c", engine_version="v1"))
        same = world.run(world.op(Op.UPGRADE, "c", version="v1"))
        assert same.row_version == row.row_version  # nothing written
        upgraded = world.run(world.op(Op.UPGRADE, "c", version="v2"))
        assert (upgraded.status, upgraded.engine_version, upgraded.previous_version) == (
            states.RUNNING, "v2", None)
        assert world.driver.running() == {row.name}
        world.assert_valid_trail("c")
    finally:
        world.close()


def test_an_engine_held_by_another_owner_past_the_wait_is_engine_busy(tmp_path: Path) -> None:
    # The wait is boot timeout + stop grace + two lease periods: 0.9 s here.
    world = World(tmp_path, Behaviour(), boot_timeout_s=0.3, stop_grace_s=0.2, lease_s=0.2)
    try:
        row, _ = world.run(world.op(Op.PROVISION, "d", engine_version="v1"))
        world.set("d", lease_owner="other-replica", lease_until=time.time() + 60)
        with pytest.raises(errors.EngineBusy) as caught:
            world.run(world.op(Op.UPGRADE, "d", version="v2"))
        assert caught.value.code == "ENGINE_BUSY"
        # Other operations keep the runner's 503 answer (the spec names 409 for an upgrade only).
        with pytest.raises(errors.Busy) as other:
            world.run(world.op(Op.STOP, "d"))
        assert other.value.code == "SCHEDULER_UNAVAILABLE"
        after = world.row("d")
        assert after is not None
        assert (after.status, after.engine_version, after.row_version) == (
            states.RUNNING, "v1", row.row_version)
        assert world.driver.running() == {row.name}
        world.set("d", lease_owner=None, lease_until=None)  # the holder lets go
        upgraded = world.run(world.op(Op.UPGRADE, "d", version="v2"))
        assert (upgraded.status, upgraded.engine_version) == (states.RUNNING, "v2")
        world.assert_valid_trail("d")
    finally:
        world.close()
