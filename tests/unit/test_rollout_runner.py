"""Rollouts in process (real SQLite registry, the real runner and lifecycle, a FakeDriver that
can fail chosen engines on a chosen version): the second batch failing rolls back the first."""

from __future__ import annotations

from pathlib import Path

from app import registry, states
from app.drivers.base import EngineSpec
from app.rollouts import RolloutRunner
from tests.inproc import Behaviour, World


def _second_batch_fails(spec: EngineSpec) -> bool:
    return spec.engine_version == "v2" and spec.user_id in {"c", "d"}


def test_a_rollout_whose_second_batch_fails_is_rolled_back_in_full(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour(never_ready_if=_second_batch_fails), boot_timeout_s=0.3)
    try:
        for user in "abcde":
            world.run(world.lifecycle.provision(world.product, user, "v1"))
        rollout = registry.rollouts.create_rollout(world.product.id, "v2", None, 2, 1)
        world.run(RolloutRunner(world.lifecycle).tick())
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
        world.run(world.lifecycle.provision(world.product, "a", "v1"))
        rollout = registry.rollouts.create_rollout(world.product.id, "v2", "v1", 1, 0)
        assert registry.rollouts.set_status(rollout, ("running",), "paused")
        runner = RolloutRunner(world.lifecycle)
        world.run(runner.tick())
        assert world.row("a").engine_version == "v1"  # type: ignore[union-attr]
        assert registry.rollouts.set_status(rollout, ("paused",), "running")
        world.run(runner.tick())
        assert world.row("a").engine_version == "v2"  # type: ignore[union-attr]
        assert registry.rollouts.reload_rollout(rollout.id).status == "succeeded"  # type: ignore[union-attr]
        assert registry.rollouts.runnable() == []
    finally:
        world.close()
