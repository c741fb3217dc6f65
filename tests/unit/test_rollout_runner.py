"""Rollouts in process (real SQLite registry, the real runner and operations, a FakeDriver that
can fail chosen engines on a chosen version, or hold a call): the second batch failing rolls
back the first; two rollouts run side by side, up to the replica's concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from app import products, registry, states
from app.drivers.base import EngineSpec
from app.operations import Op, ProductRef
from app.rollouts import RolloutRunner
from tests.inproc import Behaviour, World


def _second_batch_fails(spec: EngineSpec) -> bool:
    return spec.engine_version == "v2" and spec.user_id in {"c", "d"}


def test_a_rollout_whose_second_batch_fails_is_rolled_back_in_full(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour(never_ready_if=_second_batch_fails), boot_timeout_s=0.3)
    try:
        for user in "abcde":
            world.run(world.op(Op.PROVISION, user, engine_version="v1"))
        rollout = registry.rollouts.create_rollout(world.product.id, "v2", None, 2, 1)
        world.run(RolloutRunner(world.engines).run_once())
        done = registry.rollouts.reload_rollout(rollout.id)
        assert done is not None and done.status == "rolled_back"
        states_by_user = {t.user_id: t.state for t in registry.rollouts.targets(rollout.id)}
        assert states_by_user == {"a": "rolled_back", "b": "rolled_back", "c": "failed",
                                  "d": "failed", "e": "pending"}
        for user in "abcde":
            row = world.row(user)
            assert row is not None and (row.status, row.engine_version) == (states.RUNNING, "v1")
            world.assert_valid_trail(user)
        assert [e for e, _, _ in world.trail("a")][-4:] == ["upgrade", "upgraded", "upgrade",
                                                            "upgraded"]
        assert "upgrade" not in [e for e, _, _ in world.trail("e")]
        assert done.lease_owner is None  # released
    finally:
        world.close()


def test_a_paused_rollout_is_left_alone_and_a_finished_one_is_not_run_again(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour())
    try:
        world.run(world.op(Op.PROVISION, "a", engine_version="v1"))
        rollout = registry.rollouts.create_rollout(world.product.id, "v2", "v1", 1, 0)
        assert registry.rollouts.set_status(rollout, ("running",), "paused")
        runner = RolloutRunner(world.engines)
        world.run(runner.run_once())
        assert world.row("a").engine_version == "v1"  # type: ignore[union-attr]
        assert registry.rollouts.set_status(rollout, ("paused",), "running")
        world.run(runner.run_once())
        assert world.row("a").engine_version == "v2"  # type: ignore[union-attr]
        assert registry.rollouts.reload_rollout(rollout.id).status == "succeeded"  # type: ignore[union-attr]
        assert registry.rollouts.runnable() == []
    finally:
        world.close()


def test_two_products_rollouts_run_side_by_side_each_under_its_lease(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour())
    try:
        made, _ = products.create("q", max_engines=10, rate_limit_rpm=6000)
        other = ProductRef(made.id, made.name, made.max_engines, made.rate_limit_rpm)
        world.run(world.op(Op.PROVISION, "a", engine_version="v1"))
        world.run(world.engines.run(Op.PROVISION, (other.id, "b"), product_name=other.name,
                                    engine_version="v1"))
        first = registry.rollouts.create_rollout(world.product.id, "v2", None, 1, 0)
        second = registry.rollouts.create_rollout(other.id, "v3", None, 1, 0)
        runner = RolloutRunner(world.engines)

        async def scenario() -> None:
            # The first upgrade's launch is held: the second rollout must launch meanwhile,
            # which a replica driving one rollout after the other never would.
            gate = world.driver.gate("launch")
            drives = asyncio.gather(*runner.start_runnable())
            await asyncio.wait_for(gate.entered.wait(), 10)
            held = world.driver.calls[-1][1]
            await _within(10, lambda: any(call == "launch" and name != held
                                          for call, name in world.driver.calls[-3:]))
            for rollout in (first, second):  # both leased to this replica meanwhile
                row = registry.rollouts.reload_rollout(rollout.id)
                assert row is not None and row.lease_owner == runner.owner
            assert len(runner.drives) == 2
            gate.release.set()
            await drives

        world.run(scenario())
        for rollout, user, version in ((first, "a", "v2"), (second, "b", "v3")):
            done = registry.rollouts.reload_rollout(rollout.id)
            assert done is not None and (done.status, done.lease_owner) == ("succeeded", None)
            product = world.product if user == "a" else other
            row = registry.find_engine(product.id, user)
            assert row is not None and (row.status, row.engine_version) == (states.RUNNING, version)
        assert runner.drives == {}
    finally:
        world.close()


def test_a_replica_drives_at_most_its_concurrency_at_once(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour(), rollout_concurrency=1)
    try:
        for user in "ab":
            world.run(world.op(Op.PROVISION, user, engine_version="v1"))
        first = registry.rollouts.create_rollout(world.product.id, "v2", None, 1, 0)
        second = registry.rollouts.create_rollout(world.product.id, "v3", None, 1, 0)
        runner = RolloutRunner(world.engines)

        async def scenario() -> None:
            gate = world.driver.gate("launch")
            drives = runner.start_runnable()
            await asyncio.wait_for(gate.entered.wait(), 10)
            assert runner.start_runnable() == [] and list(runner.drives) == [first.id]
            waiting = registry.rollouts.reload_rollout(second.id)
            assert waiting is not None and waiting.lease_owner is None  # free for another replica
            gate.release.set()
            await asyncio.gather(*drives)
            await asyncio.gather(*runner.start_runnable())  # its slot is free: the second runs

        world.run(scenario())
        assert [registry.rollouts.reload_rollout(r.id).status  # type: ignore[union-attr]
                for r in (first, second)] == ["succeeded", "succeeded"]
        for user in "ab":
            assert world.row(user).engine_version == "v3"  # type: ignore[union-attr]
    finally:
        world.close()


async def _within(seconds: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)
