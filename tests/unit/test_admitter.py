"""The Admitter, in process: each answer of the spec's admit, and its bound in time."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app import errors, states
from app.operations import Op
from tests.inproc import Behaviour, World


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path)
    yield w
    w.close()


def admit(world: World, user_id: str, **flags: bool) -> dict[str, object]:
    return world.run(world.admitter.admit(world.product, user_id, **flags))


def test_hot_path_answers_from_the_row_and_records_activity(world: World) -> None:
    row, key = world.run(world.op(Op.PROVISION, "a"))
    answer = admit(world, "a")
    assert answer == {"admitted": True, "user_id": "a", "url": row.url, "api_key": key,
                      "status": "running", "engine_version": row.engine_version,
                      "provisioned": False, "woken": False}
    assert world.row("a").last_admit_at is not None  # type: ignore[union-attr]


def test_the_denials(tmp_path: Path) -> None:
    world = World(tmp_path, max_restarts=0)
    try:
        assert admit(world, "none") == {"admitted": False, "reason": "engine_not_found", "status": None}
        world.run(world.op(Op.PROVISION, "zzz"))
        world.left_by_dead_owner("zzz", "sleep", lease_s=0)
        assert admit(world, "zzz", auto_wake=False)["reason"] == "engine_sleeping"
        world.run(world.op(Op.PROVISION, "halt"))
        world.run(world.op(Op.STOP, "halt"))
        assert admit(world, "halt", auto_provision=True, auto_wake=True) == {
            "admitted": False, "reason": "engine_stopped", "status": "stopped"}
        world.run(world.op(Op.PROVISION, "sick"))
        world.left_by_dead_owner("sick", "fail", lease_s=0, failure_reason="crashed")
        assert admit(world, "sick", auto_wake=True)["reason"] == "engine_unhealthy"
    finally:
        world.close()


def test_auto_provision_and_auto_wake(world: World) -> None:
    answer = admit(world, "new", auto_provision=True)
    assert answer["admitted"] and answer["provisioned"] and not answer["woken"]
    world.left_by_dead_owner("new", "sleep", lease_s=0)
    answer = admit(world, "new", auto_wake=True)
    assert answer["admitted"] and answer["woken"] and answer["status"] == "running"
    world.assert_valid_trail("new")


def test_a_failed_engine_with_restarts_left_is_restarted_at_once(world: World) -> None:
    world.run(world.op(Op.PROVISION, "f"))
    world.left_by_dead_owner("f", "fail", lease_s=0, failure_reason="crashed")
    world.set("f", next_restart_at=time.time() + 3600)  # the backoff does not hold a waiting user
    assert admit(world, "f")["admitted"] is True
    assert world.row("f").restarts == 1  # type: ignore[union-attr]


def test_a_slow_boot_in_flight_is_waited_for(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour(boot_s=0.4))
    try:
        async def scenario() -> dict[str, object]:
            provisioning = asyncio.create_task(world.op(Op.PROVISION, "slow"))
            await asyncio.sleep(0.1)
            assert world.status("slow") == states.PROVISIONING
            answer = await world.admitter.admit(world.product, "slow")
            await provisioning
            return answer

        assert world.run(scenario())["admitted"] is True
    finally:
        world.close()


def test_an_engine_that_never_gets_ready_is_504_within_the_boot_timeout(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour(never_ready=True), boot_timeout_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(errors.BootTimeout):
            admit(world, "never", auto_provision=True)
        assert time.monotonic() - started < 1.5
        row = world.row("never")
        assert row is not None and row.status == states.FAILED and row.failure_reason == "boot_timeout"
    finally:
        world.close()


def test_another_replicas_boot_is_waited_for_and_a_dead_ones_taken_over(world: World) -> None:
    async def scenario() -> dict[str, object]:
        await world.op(Op.PROVISION, "o")
        world.left_by_dead_owner("o", "fail", lease_s=0)
        world.left_by_dead_owner("o", "start", lease_s=0.3)  # its owner died while it booted
        return await world.admitter.admit(world.product, "o")

    assert world.run(scenario())["admitted"] is True
    assert world.status("o") == states.RUNNING


def test_rate_limit(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        from app.operations import ProductRef
        world.product = ProductRef(world.product.id, "p", 10, 2)
        world.run(world.op(Op.PROVISION, "rl"))
        admit(world, "rl")
        admit(world, "rl")
        with pytest.raises(errors.RateLimited) as caught:
            admit(world, "rl")
        assert caught.value.retry_after is not None and caught.value.retry_after >= 1
    finally:
        world.close()


def test_quota_applies_to_auto_provision(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        from app.operations import ProductRef
        from app.registry import Product
        Product.update(max_engines=1).where(Product.id == world.product.id).execute()
        world.product = ProductRef(world.product.id, "p", 1, 6000)
        admit(world, "one", auto_provision=True)
        with pytest.raises(errors.QuotaExceeded):
            admit(world, "two", auto_provision=True)
        assert world.row("two") is None
    finally:
        world.close()
