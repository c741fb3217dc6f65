"""The Reconciler, in process: crash, unhealthy, idle sleep, restart with backoff, recovery
of a dead owner's work, and orphans. Every repair goes through the runner."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from app import states
from app.operations import Op
from app.registry import EngineRow
from tests.inproc import Behaviour, World


async def crashed(world: World, user_id: str) -> EngineRow:
    """A new engine of `user_id`, crashed and failed by a reconciler pass."""
    row, _ = await world.op(Op.PROVISION, user_id)
    world.driver.crash(row.name)
    await world.reconciler.pass_once(wait=True)
    failed = world.row(user_id)
    assert failed is not None and failed.status == states.FAILED
    return failed


def test_a_crashed_engine_fails_then_is_restarted_then_given_up(tmp_path: Path) -> None:
    world = World(tmp_path, max_restarts=1)
    try:
        async def scenario() -> None:
            failed = await crashed(world, "c")
            assert failed.failure_reason == "crashed" and failed.next_restart_at is not None
            world.set("c", next_restart_at=time.time() - 1)  # its backoff is over
            await world.reconciler.pass_once(wait=True)
            assert world.status("c") == states.RUNNING
            world.driver.crash(failed.name)
            await world.reconciler.pass_once(wait=True)
            world.set("c", next_restart_at=time.time() - 1)
            await world.reconciler.pass_once(wait=True)
            assert world.status("c") == states.FAILED  # out of restarts

        world.run(scenario())
        world.assert_valid_trail("c")
    finally:
        world.close()


def test_unhealthy_past_the_grace_period_fails(tmp_path: Path) -> None:
    world = World(tmp_path, health_grace_s=0.2)
    try:
        async def scenario() -> None:
            row, _ = await world.op(Op.PROVISION, "u")
            world.driver.engines[row.name].healthy = False
            await world.reconciler.pass_once(wait=True)
            assert world.status("u") == states.RUNNING  # within the grace
            await asyncio.sleep(0.25)
            await world.reconciler.pass_once(wait=True)

        world.run(scenario())
        row = world.row("u")
        assert row is not None and row.status == states.FAILED and row.failure_reason == "unhealthy"
    finally:
        world.close()


def test_an_idle_engine_sleeps_and_a_busy_one_does_not(tmp_path: Path) -> None:
    world = World(tmp_path, idle_sleep_s=0.3)
    try:
        async def scenario() -> None:
            idle, _ = await world.op(Op.PROVISION, "idle")
            await world.op(Op.PROVISION, "busy")
            await asyncio.sleep(0.35)
            await world.admitter.admit(world.product, "busy")
            await world.reconciler.pass_once(wait=True)
            assert world.driver.engines[idle.name].paused

        world.run(scenario())
        assert world.status("idle") == states.SLEEPING
        assert world.status("busy") == states.RUNNING
    finally:
        world.close()


def test_sleep_mode_stop_stops_the_task(tmp_path: Path) -> None:
    world = World(tmp_path, idle_sleep_s=0.1, sleep_mode="stop")
    try:
        async def scenario() -> None:
            await world.op(Op.PROVISION, "cold")
            await asyncio.sleep(0.15)
            await world.reconciler.pass_once(wait=True)
            row = world.row("cold")
            assert row is not None and row.status == states.SLEEPING and row.url is None
            answer = await world.admitter.admit(world.product, "cold", auto_wake=True)
            assert answer["woken"] is True

        world.run(scenario())
    finally:
        world.close()


def test_a_dead_owners_transient_rows_are_finished(tmp_path: Path) -> None:
    world = World(tmp_path, Behaviour(stop_s=0.1), lease_s=0.2)
    try:
        async def scenario() -> None:
            await world.op(Op.PROVISION, "stopping")
            await world.op(Op.PROVISION, "destroying")
            world.left_by_dead_owner("stopping", "stop")
            world.left_by_dead_owner("destroying", "destroy")
            await world.reconciler.pass_once(wait=True)  # leases still live: left alone
            assert world.status("stopping") == states.STOPPING
            await asyncio.sleep(0.25)
            await world.reconciler.pass_once(wait=True)

        world.run(scenario())
        assert world.status("stopping") == states.STOPPED
        assert world.row("destroying") is None
        world.assert_valid_trail("stopping")
        world.assert_valid_trail("destroying")
    finally:
        world.close()


def test_orphans_are_removed_after_four_lease_periods(tmp_path: Path) -> None:
    world = World(tmp_path, lease_s=0.05)
    try:
        async def scenario() -> None:
            from tests.fake_driver import FakeEngine
            world.driver.engines["e-p-orphan-000000000000"] = FakeEngine(generation=99)
            await world.reconciler.pass_once(wait=True)
            assert "e-p-orphan-000000000000" in world.driver.engines  # not yet
            await asyncio.sleep(0.25)
            await world.reconciler.pass_once(wait=True)

        world.run(scenario())
        assert world.driver.engines == {}
        from app import registry
        assert registry.recent_events(1)[0].event == "orphan_removed"
    finally:
        world.close()


def test_the_scheduler_away_is_no_bad_news(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        async def scenario() -> None:
            await world.op(Op.PROVISION, "calm")
            world.driver.behaviour.scheduler_down = True
            await world.reconciler.pass_once(wait=True)

        world.run(scenario())
        assert world.status("calm") == states.RUNNING
    finally:
        world.close()


def test_at_rest_a_tick_reads_only_what_can_have_changed(tmp_path: Path) -> None:
    """With nothing written since the last tick, a tick sends SQLite no statement
    (whether anything changed is read from the WAL-index header); a write by another
    connection (a replica, the CLI) is read at the next tick; a failed engine's backoff ends
    on the row already read."""
    import sqlite3

    if world_is_postgres():
        return  # PostgreSQL has no change counter: every tick reads
    world = World(tmp_path, max_restarts=3, restart_backoff_s=60.0, idle_sleep_s=0.0,
                  lease_s=60.0, health_interval_s=60.0, resync_s=600.0)  # nothing else due
    statements: list[str] = []
    try:
        async def scenario() -> None:
            failed = await crashed(world, "r")
            reconciler, now = world.reconciler, time.time()
            reconciler.shards = None
            await reconciler.tick(now)  # reads what changed: the failure above
            conn = world.database.connection()
            conn.set_trace_callback(statements.append)
            try:
                for n in range(1, 4):
                    await reconciler.tick(now + n * 0.1)
                assert statements == []  # not even a query to ask: the WAL-index header
                statements.clear()
                other = sqlite3.connect(world.settings.database_url[len("sqlite:///"):])
                other.execute("UPDATE engine SET status_since = status_since")  # another writer
                other.commit()
                other.close()
                await reconciler.tick(now + 0.5)
                assert any("FROM \"engine\"" in s for s in statements)  # it looked again
                statements.clear()
                # The backoff ends with nothing written meanwhile: the restart starts from
                # the row as read.
                await reconciler.tick((failed.next_restart_at or 0) + 0.1)
                # No restartable failed rows read (the restart count is what picks them).
                assert not any("'failed'" in s and '"restarts" <' in s for s in statements)
            finally:
                conn.set_trace_callback(None)
            await asyncio.gather(*list(reconciler._inflight), return_exceptions=True)

        world.run(scenario())
        assert world.status("r") == states.RUNNING  # restarted
    finally:
        world.close()


def world_is_postgres() -> bool:
    import os

    return os.environ.get("ORCH_TEST_DB") == "postgres"


def test_an_engine_whose_node_is_lost_spends_no_restart_and_comes_back_with_its_node(
        tmp_path: Path) -> None:
    world = World(tmp_path, max_restarts=2, node_lost_restore_s=3600)
    try:
        async def scenario() -> None:
            row, _ = await world.op(Op.PROVISION, "n")
            world.driver.lost.add(row.name)
            await world.reconciler.pass_once(wait=True)
            failed = world.row("n")
            assert failed is not None and failed.failure_reason == "node_lost"
            for _ in range(3):  # more passes than restarts: none is spent on a down node
                world.set("n", next_restart_at=time.time() - 1)
                await world.reconciler.pass_once(wait=True)
            waiting = world.row("n")
            assert waiting is not None and waiting.status == states.FAILED
            assert waiting.restarts == 0 and waiting.status_since == failed.status_since
            assert ("launch", row.name) not in world.driver.calls[-6:]
            world.driver.lost.discard(row.name)  # the node is back, the brain with it
            world.set("n", next_restart_at=time.time() - 1)
            await world.reconciler.pass_once(wait=True)
            assert world.status("n") == states.RUNNING

        world.run(scenario())
        world.assert_valid_trail("n")
    finally:
        world.close()


def test_a_lost_engine_without_a_snapshot_waits_for_its_node(tmp_path: Path) -> None:
    world = World(tmp_path, node_lost_restore_s=0.01, lease_s=0.05)
    try:
        async def scenario() -> None:
            row, _ = await world.op(Op.PROVISION, "n")
            world.driver.lost.add(row.name)
            await world.reconciler.pass_once(wait=True)
            await asyncio.sleep(0.05)
            await world.reconciler.pass_once(wait=True)  # due: nothing to restore from
            waiting = world.row("n")
            assert waiting is not None and waiting.status == states.FAILED
            assert waiting.failure_reason == "node_lost"
            assert [e for e, _, _ in world.trail("n")].count("restored") == 0

        world.run(scenario())
    finally:
        world.close()


def test_what_a_driver_left_on_a_down_node_is_tidied_once_it_is_back(tmp_path: Path) -> None:
    world = World(tmp_path, lease_s=0.05)
    try:
        async def scenario() -> None:
            row, _ = await world.op(Op.PROVISION, "t")
            state = {**row.driver_state, "leftovers": [{"volume": "v-old"}]}
            world.set("t", driver_state=json.dumps(state))
            await world.reconciler.pass_once(wait=True)
            kept = world.row("t")
            assert kept is not None and kept.driver_state["leftovers"] == [{"volume": "v-old"}]
            world.driver.nodes_back = True
            await asyncio.sleep(0.06)
            await world.reconciler.pass_once(wait=True)
            tidied = world.row("t")
            assert tidied is not None and "leftovers" not in tidied.driver_state
            assert tidied.status == states.RUNNING and tidied.driver_state == row.driver_state

        world.run(scenario())
    finally:
        world.close()


def test_a_sleeping_engine_whose_node_is_lost_fails_without_an_admit(tmp_path: Path) -> None:
    world = World(tmp_path, idle_sleep_s=0.05, lease_s=0.05)
    try:
        async def scenario() -> None:
            row, _ = await world.op(Op.PROVISION, "s")
            await asyncio.sleep(0.06)
            await world.reconciler.pass_once(wait=True)
            assert world.status("s") == states.SLEEPING
            await asyncio.sleep(0.06)
            await world.reconciler.pass_once(wait=True)
            assert world.status("s") == states.SLEEPING  # its node is up: it sleeps on
            world.driver.lost.add(row.name)
            await asyncio.sleep(0.06)
            await world.reconciler.pass_once(wait=True)

        world.run(scenario())
        failed = world.row("s")
        assert failed is not None and failed.status == states.FAILED
        assert failed.failure_reason == "node_lost"
        world.assert_valid_trail("s")
    finally:
        world.close()
