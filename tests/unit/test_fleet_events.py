"""On the local driver an engine's end is an event (a pidfd per engine, read
by the event loop), so a killed engine is failed at once, by one probe, with no reconciler pass:
real engine processes (the reference engine), the real runner and registry, in process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from app import states
from app.drivers import make_driver
from app.reconciler import Reconciler
from app.registry import EngineRow
from tests.harness import free_port_range
from tests.inproc import World

WAIT_S = 10.0  # a bound for a loaded machine, not a speed claim (that is `make bench`)


def local_world(tmp_path: Path) -> World:
    """The in-process World, on the local driver: engines are real child processes."""
    world = World(tmp_path, state_dir=tmp_path / "state", brain_root=tmp_path / "brains",
                  port_range=free_port_range(8), boot_timeout_s=10.0,
                  health_interval_s=3600.0, resync_s=3600.0)  # no health check would see it
    world.driver = make_driver(world.settings)  # type: ignore[assignment]
    world.restart()
    return world


async def wait_status(world: World, user_id: str, status: str) -> EngineRow:
    deadline = time.monotonic() + WAIT_S
    while True:
        row = world.row(user_id)
        if row is not None and row.status == status:
            return row
        assert time.monotonic() < deadline, f"{user_id} is {row and row.status}, not {status}"
        await asyncio.sleep(0.01)


async def cleanup(world: World, *users: str) -> None:
    for user in users:
        await world.lifecycle.destroy(world.product, user)
    await world.driver.close()


def test_a_killed_engine_is_failed_by_its_exit_event(tmp_path: Path) -> None:
    world = local_world(tmp_path)
    try:
        async def scenario() -> None:
            row, _ = await world.lifecycle.provision(world.product, "k")
            reconciler = world.reconciler
            assert reconciler.events  # the local driver reports exits
            try:
                os.kill(row.driver_state["pid"], signal.SIGKILL)
                failed = await wait_status(world, "k", states.FAILED)
                assert failed.failure_reason == "crashed"
                # No pass ran: the exit event alone led to the one probe that confirmed it.
                assert reconciler.exit_events == 1 and reconciler.probes == 1
            finally:
                await cleanup(world, "k")

        world.run(scenario())
        world.assert_valid_trail("k")
    finally:
        world.close()


def test_an_adopted_engine_is_watched_and_one_that_ended_unseen_is_caught_by_the_resync(
        tmp_path: Path) -> None:
    """A restarted orchestrator did not launch its engines: the resync has the driver watch
    each running one; an engine that ended while nobody watched is reported at once."""
    world = local_world(tmp_path)
    try:
        async def scenario() -> None:
            alive, _ = await world.lifecycle.provision(world.product, "alive")
            gone, _ = await world.lifecycle.provision(world.product, "gone")
            await world.driver.close()  # the first orchestrator goes away; its engines stay
            world.driver = make_driver(world.settings)  # type: ignore[assignment]
            world.restart()
            reconciler = world.reconciler
            try:
                os.kill(gone.driver_state["pid"], signal.SIGKILL)
                reconciler.resync(time.time())  # the start-up resync: no probe, only watches
                assert reconciler.probes == 0
                await wait_status(world, "gone", states.FAILED)
                assert reconciler.probes == 1
                os.kill(alive.driver_state["pid"], signal.SIGKILL)
                failed = await wait_status(world, "alive", states.FAILED)
                assert failed.failure_reason == "crashed" and reconciler.probes == 2
            finally:
                await cleanup(world, "alive", "gone")

        world.run(scenario())
    finally:
        world.close()


def test_a_stop_is_not_taken_for_a_crash(tmp_path: Path) -> None:
    world = local_world(tmp_path)
    try:
        async def scenario() -> None:
            await world.lifecycle.provision(world.product, "s")
            try:
                await world.lifecycle.stop(world.product, "s")
                await asyncio.sleep(0.2)
                assert world.status("s") == states.STOPPED
                assert world.reconciler.probes == 0
            finally:
                await cleanup(world, "s")

        world.run(scenario())
        world.assert_valid_trail("s")
    finally:
        world.close()


def test_a_reconciler_without_events_still_checks_health(tmp_path: Path) -> None:
    """The fake driver has no exit events: the schedule's health checks find the crash."""
    world = World(tmp_path)
    try:
        async def scenario() -> None:
            row, _ = await world.lifecycle.provision(world.product, "p")
            reconciler = Reconciler(world.lifecycle)
            assert not reconciler.events
            world.driver.crash(row.name)
            now = time.time()
            for step in range(40):  # ticks over four health intervals
                await reconciler.tick(now + step * world.settings.tick_s)
                if world.status("p") == states.FAILED:
                    break
            await wait_status(world, "p", states.FAILED)

        world.run(scenario())
    finally:
        world.close()
