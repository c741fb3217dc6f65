"""The operations runner, in process: a crash mid-destroy, the reconciler beside an
operation, taking over a dead owner's work, waiting on a live one, and single flight."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app import errors, states
from tests.inproc import Behaviour, World


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path)
    yield w
    w.close()


def test_admit_after_a_crash_mid_destroy_answers_within_the_boot_timeout(tmp_path: Path) -> None:
    """Provision `dl` (an engine that ignores SIGTERM), DELETE it, kill the orchestrator
    mid-destroy, restart, admit with auto_provision: the admit answers within the boot timeout.
    It must not wait out two leases, the boot timeout and the stop grace and then answer 503,
    as it would if only the reconciler could finish the destroy (its recovery waits behind
    the admit's flight)."""
    world = World(tmp_path, Behaviour(stop_s=0.5))
    try:
        async def scenario() -> tuple[dict[str, object], float]:
            await world.lifecycle.provision(world.product, "dl")
            world.left_by_dead_owner("dl", "destroy")  # SIGKILLed 1 s into DELETE
            world.restart()
            reconciling = asyncio.create_task(world.reconciler.run_forever())
            started = time.monotonic()
            try:
                answer = await world.admitter.admit(world.product, "dl", auto_provision=True)
            finally:
                reconciling.cancel()
            return answer, time.monotonic() - started

        answer, elapsed = world.run(scenario())
        assert answer["admitted"] is True and answer["provisioned"] is True
        assert elapsed < world.settings.boot_timeout_s
        assert world.status("dl") == states.RUNNING
        assert len(world.driver.destroyed) == 1  # the old incarnation's destroy was finished
        trail = world.trail("dl")
        assert ("destroyed", "destroying", None) in trail
        assert trail[-2:] == [("provision", None, "provisioning"), ("ready", "provisioning", "running")]
        world.assert_valid_trail("dl")
    finally:
        world.close()


def test_admit_answers_within_the_boot_timeout_even_when_the_engine_is_held(tmp_path: Path) -> None:
    """Whatever holds the engine (here a live owner's destroy that never ends), admit
    answers 504 within the boot timeout instead of waiting for the lease."""
    world = World(tmp_path, boot_timeout_s=1.0)
    try:
        async def scenario() -> float:
            await world.lifecycle.provision(world.product, "held")
            world.left_by_dead_owner("held", "destroy", lease_s=3600)
            started = time.monotonic()
            with pytest.raises(errors.BootTimeout):
                await world.admitter.admit(world.product, "held", auto_provision=True)
            return time.monotonic() - started

        elapsed = world.run(scenario())
        assert elapsed < 2 * world.settings.boot_timeout_s
    finally:
        world.close()


@pytest.mark.parametrize("replica", ["same process", "another replica"])
def test_the_reconciler_never_writes_under_an_operation(world: World, replica: str) -> None:
    """Resetting a healthy engine's restart count, the reconciler must respect the lease:
    a write that ignored it would make the operation holding the lease lose its
    compare-and-set (Conflict -> 500)."""
    async def scenario() -> object:
        await world.lifecycle.provision(world.product, "r")
        world.set("r", restarts=1, status_since=time.time() - 3600)  # healthy for an hour
        gate = world.driver.gate("ping")
        stop = asyncio.create_task(world.lifecycle.stop(world.product, "r"))
        await gate.entered.wait()  # the stop holds the lease and has read the row
        reconciler = world.reconciler if replica == "same process" else \
            type(world.reconciler)(world.new_lifecycle())
        await reconciler.pass_once(wait=True)
        gate.release.set()
        return await stop

    row = world.run(scenario())
    assert row.status == states.STOPPED
    assert world.status("r") == states.STOPPED


def test_the_restart_count_is_reset_when_nothing_holds_the_engine(world: World) -> None:
    async def scenario() -> None:
        await world.lifecycle.provision(world.product, "calm")
        world.set("calm", restarts=2, status_since=time.time() - 3600)
        await world.reconciler.pass_once(wait=True)

    world.run(scenario())
    row = world.row("calm")
    assert row is not None and row.restarts == 0 and row.lease_owner is None


def test_a_live_owner_is_waited_for_then_the_operation_applies(world: World) -> None:
    """Another replica's stop holds the lease; a start here waits for it, then starts."""
    async def scenario() -> str:
        await world.lifecycle.provision(world.product, "w")
        other = world.new_lifecycle()
        gate = world.driver.gate("stop")
        stopping = asyncio.create_task(other.stop(world.product, "w"))
        await gate.entered.wait()
        starting = asyncio.create_task(world.lifecycle.start(world.product, "w"))
        await asyncio.sleep(0.2)
        assert not starting.done()  # waiting on the other owner's lease
        gate.release.set()
        await stopping
        row = await starting
        await other.close()
        return row.status

    assert world.run(scenario()) == states.RUNNING
    assert [e for e, _, _ in world.trail("w")][-4:] == ["stop", "stopped", "start", "ready"]


def test_a_dead_owners_lease_is_taken_over_and_its_operation_finished(world: World) -> None:
    """An orchestrator died mid-stop; once its lease runs out, the next operation finishes
    the stop (here a start, which then brings the engine back)."""
    async def scenario() -> str:
        await world.lifecycle.provision(world.product, "t")
        world.left_by_dead_owner("t", "stop")
        world.restart()
        started = time.monotonic()
        row = await world.lifecycle.start(world.product, "t")
        assert time.monotonic() - started >= world.settings.lease_s * 0.5  # it did wait
        return row.status

    assert world.run(scenario()) == states.RUNNING
    events = world.trail("t")
    assert ("stopped", "stopping", "stopped") in events
    world.assert_valid_trail("t")


def test_200_concurrent_admits_provision_one_engine(world: World) -> None:
    async def scenario() -> list[dict[str, object]]:
        return list(await asyncio.gather(*(
            world.admitter.admit(world.product, "crowd", auto_provision=True) for _ in range(200))))

    answers = world.run(scenario())
    assert all(a["admitted"] for a in answers)
    assert len({a["api_key"] for a in answers}) == 1
    assert [c for c in world.driver.calls if c[0] == "create"] == [("create", "e-p-crowd-" + (
        world.row("crowd").name.rsplit("-", 1)[1]))]  # type: ignore[union-attr]


def test_a_conflict_is_a_domain_error_not_a_crash(world: World) -> None:
    """Should a compare-and-set still lose, the caller gets SCHEDULER_UNAVAILABLE (503: try
    again, nothing changed), never an unmapped exception."""
    async def scenario() -> None:
        await world.lifecycle.provision(world.product, "c")

    world.run(scenario())
    from app import registry
    row = world.row("c")
    assert row is not None
    registry.update(row, restarts=1)
    with pytest.raises(errors.Conflict) as caught:
        registry.update(row, restarts=2)  # read before the change above
    assert caught.value.code == "SCHEDULER_UNAVAILABLE"
